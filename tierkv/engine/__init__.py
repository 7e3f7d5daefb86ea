"""Requests, scheduling, the model runner, the step loop and the offline API."""
