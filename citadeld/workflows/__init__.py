"""Multi-step workflows (issue 5): spec validation, durable state, claiming across instances
and a supervised runner that executes steps through the daemon's own services."""
