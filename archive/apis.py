"""REST v1 additions for periods: a counter's history from the archive, and batch resets."""

from rest_framework.response import Response
from rest_framework.views import APIView

from counters import selectors, services
from counters.auth import checked_name, request_app_id, request_key
from counters.clock import iso_utc
from counters.permissions import check_manage, check_read

from .selectors import period_history_get
from .serializers import BatchResetInputSerializer, HistoryQuerySerializer


class CounterHistoryView(APIView):
    """GET /api/v1/counter/{name}/history?days=7[&user_id=...]: closed periods, newest first."""

    error_shape = "rest"

    def get(self, request, name: str) -> Response:
        key = request_key(request)
        counter = selectors.counter_get(app_id=request_app_id(request, key), name=checked_name(name))
        check_read(key, counter)
        query = HistoryQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        days = query.validated_data["days"]
        subject = query.validated_data.get("user_id", "") if counter.is_user_scoped else ""
        history = period_history_get(counter=counter, subject=subject, days=days)
        current = history.current
        return Response(
            {
                "name": counter.name,
                "period": counter.period,
                "time_zone": counter.time_zone,
                "days": days,
                "current": {
                    "period": current.window.key,
                    "value": current.value,
                    "last_updated": iso_utc(current.last_updated),
                    "last_reset": iso_utc(current.window.start),
                    "next_reset": iso_utc(current.window.end),
                },
                "history": [
                    {
                        "period": p.period,
                        "start": iso_utc(p.start),
                        "end": iso_utc(p.end),
                        "value": p.final_value,
                        "peak": p.peak,
                        "operations": p.operations,
                    }
                    for p in history.closed
                ],
            }
        )


class CounterBatchResetView(APIView):
    """POST /api/v1/counters/reset: several counters, one reason; all checked before any changes."""

    error_shape = "rest"

    def post(self, request) -> Response:
        data = BatchResetInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        key = request_key(request, body_token=data.validated_data.get("admin_token"))
        app_id = request_app_id(request, key)
        requests = []
        for item in data.validated_data["counters"]:
            counter = selectors.counter_get(app_id=app_id, name=checked_name(item["name"]))
            check_manage(key, counter)
            subject = item.get("user_id", "") if counter.is_user_scoped else ""
            requests.append(services.ResetRequest(counter=counter, subject=subject, value=item.get("reset_value")))
        outcomes = services.counters_reset_batch(
            requests=requests, reason=data.validated_data["reason"], operator=f"api-key:{key.prefix}"
        )
        results = []
        for outcome in outcomes:
            entry = {"name": outcome.request.counter.name, "success": outcome.error is None}
            if outcome.request.subject:
                entry["user_id"] = outcome.request.subject
            if outcome.result is not None:
                entry["previous_value"] = outcome.result.old_value
                entry["current_value"] = outcome.result.new_value
            else:
                entry["error"] = {"code": outcome.error.code, "message": outcome.error.message}
            results.append(entry)
        failed = [o.error for o in outcomes if o.error is not None]
        body = {"success": not failed, "reason": data.validated_data["reason"], "results": results}
        return Response(body, status=failed[0].status if failed else 200)
