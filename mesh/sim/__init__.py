"""Simulate a topology on one machine: docker-compose or network namespaces (`mesh sim`)."""
