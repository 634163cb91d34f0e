"""The job-orchestrator service: the job state machine, schedules, plans, retention."""
