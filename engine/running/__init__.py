"""Running: tool context, registry, runner, jobs, run history, live transplants, rebuilds."""
