import json

from django.db import connection, transaction
from django.db.models import F
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_POST

from orders.models import Order, Stock
from orders.tasks import client
from taskq import InvalidRequest


class OutOfStock(Exception):
    pass


@require_POST
def place_order(request: HttpRequest) -> JsonResponse:
    """Record the order, enqueue its confirmation, reserve the stock: all or nothing."""
    try:
        body = json.loads(request.body)
        sku, email = str(body["sku"]), str(body["email"])
    except (ValueError, KeyError, TypeError):
        return JsonResponse({"error": "send a JSON object with sku and email"}, status=400)
    try:
        with transaction.atomic():
            order = Order.objects.create(sku=sku, email=email)
            task = client.enqueue(
                "shop.order_confirmation.v1",
                {"order_id": order.pk, "email": email},
                connection=connection,  # Django's, so the task is written in this transaction
            )
            reserved = Stock.objects.filter(sku=sku, available__gt=0).update(
                available=F("available") - 1
            )
            if not reserved:
                raise OutOfStock(sku)  # leaving atomic() with it rolls back: no order, no task
    except OutOfStock:
        return JsonResponse({"error": f"{sku} is out of stock"}, status=409)
    except InvalidRequest as exc:
        return JsonResponse({"error": str(exc)}, status=400)
    # Committed: the relay, woken by the commit, publishes the task now.
    return JsonResponse({"order_id": order.pk, "task_id": str(task.id)}, status=201)
