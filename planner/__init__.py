"""The planner (sets the prefill/decode split from live load, switches worker roles, asks an orchestrator
for more or fewer workers) and the cluster simulator that runs it with the real RoutingPolicy."""
