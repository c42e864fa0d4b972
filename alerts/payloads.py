"""What an alert says: the event payload and the custom-endpoint templates filled from it.

A template is JSON whose strings may hold ``${name}`` placeholders (``string.Template``): only
the names below are known, nothing is evaluated and no attribute is ever looked up. A string
that is exactly one placeholder keeps the value's JSON type (a number stays a number).
"""

from string import Template

PLACEHOLDERS = {
    "event_id": 1,
    "app": "app",
    "counter": "counter",
    "counter_display_name": "Counter",
    "subject": "u1",
    "player_id": "u1",
    "period": "2024-01-15",
    "threshold_id": 1,
    "threshold": 100,
    "direction": "up",
    "level": "info",
    "triggered_at": "2024-01-15T10:30:00Z",
}

MAX_DEPTH = 8


class PayloadTemplateError(ValueError):
    pass


def _fill(text: str, variables: dict):
    template = Template(text)
    if not template.is_valid():
        raise PayloadTemplateError(f"Bad placeholder in {text!r}: use ${{name}}; write $$ for a dollar sign.")
    names = template.get_identifiers()
    unknown = sorted(set(names) - set(variables))
    if unknown:
        raise PayloadTemplateError(f"Unknown placeholder(s) {', '.join(unknown)}; known: {', '.join(PLACEHOLDERS)}.")
    if len(names) == 1 and text in (f"${names[0]}", f"${{{names[0]}}}"):
        return variables[names[0]]
    return template.substitute({name: str(value) for name, value in variables.items()})


def _walk(node, variables: dict, depth: int = 0):
    if depth > MAX_DEPTH:
        raise PayloadTemplateError(f"Templates nest at most {MAX_DEPTH} levels.")
    if isinstance(node, dict):
        return {str(key): _walk(value, variables, depth + 1) for key, value in node.items()}
    if isinstance(node, list):
        return [_walk(value, variables, depth + 1) for value in node]
    if isinstance(node, str):
        return _fill(node, variables)
    return node


def render_template(template, variables: dict):
    """The JSON body of a custom-endpoint call; an empty template sends the event payload itself."""
    if template in ({}, [], None, ""):
        return dict(variables)
    return _walk(template, variables)


def check_template(template) -> None:
    render_template(template, PLACEHOLDERS)
