"""Routing prompt requests to engine workers: the cost model and the router stage."""
