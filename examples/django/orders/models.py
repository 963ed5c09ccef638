from django.db import models


class Stock(models.Model):
    sku = models.TextField(primary_key=True)
    available = models.PositiveIntegerField()


class Order(models.Model):
    sku = models.TextField()
    email = models.TextField()
