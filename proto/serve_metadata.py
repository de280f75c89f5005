"""gRPC metadata the Executor's Serve stream negotiates with, in one place for both ends
(services/executor/server.py and services/gateway/executor_client.py)."""

# A gateway sends it when it reads StepOutput's token columns (one built before them would drop
# every token but the first and last).
STEP_COLUMNS = ("pagemesh-step-columns", "1")
# An executor sends it in its Serve headers when it reads ServeRequest.generate_batch (one built
# before them would drop the unknown kind).
GENERATE_BATCH = ("pagemesh-generate-batch", "1")
