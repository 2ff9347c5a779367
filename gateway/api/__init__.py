"""The HTTP edge: dependencies, error mapping, one package per API, and the plain routes."""
