"""`weir bench`: a load generator for any Open Inference (KServe V2) gRPC server on loopback.

The pure parts (options, targets, slo, summary, prometheus, schedule, payload) are plain functions;
worker (one grpc.aio event loop per process) and runner (the processes, the levels, the metrics scrapes)
are the shells; report writes the results. Nothing heavy is imported here: `weir serve` builds its
parser from ``weir.loadtest.options`` without loading numpy, grpc or matplotlib for the bench.
"""
