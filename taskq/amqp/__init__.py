"""RabbitMQ: the connection and publisher, frames written by hand, the envelope and the topology's
names.
"""
