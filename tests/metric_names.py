"""Every metric the service exports, by the name a PromQL query uses: the monitoring configuration is
checked against these lists (``test_monitoring_config``), and the lists against a live scrape
(``test_metrics_processes``)."""

from __future__ import annotations

# The same value on every target (read from Redis, or a reachability that every process shares): max
# over targets, never sum.
SERVICE_WIDE = {
    # API (read from Redis at scrape time)
    "session_sessions",
    "session_sessions_created_total",
    "session_messages_total",
    "session_tokens_total",
    "session_cost_dollars_total",
    "session_memories_total",
    "session_rehydrations_total",
    "session_hot_sessions",
    "session_workers_alive",
    "session_redis_memory_used_bytes",
    "session_redis_memory_max_bytes",
    # API and worker
    "session_redis_up",
    "session_postgres_up",
    "session_build_info",
    # worker
    "session_outbox_backlog_entries",
    "session_outbox_oldest_age_seconds",
    "session_outbox_dead_letters",
}
# Every metric the service exports, by the name a PromQL query uses (histograms by their base name: the
# series are <name>_bucket, _sum and _count). API on SERVICE_PORT /metrics, worker on WORKER_METRICS_PORT.
EXPORTED = SERVICE_WIDE | {
    # API, per process
    "session_http_requests_total",
    "session_http_request_duration_seconds",
    "session_http_requests_in_flight",
    "session_redis_call_duration_seconds",
    "session_redis_pool_wait_seconds",
    "session_redis_failures_total",
    "session_postgres_query_duration_seconds",
    "session_postgres_failures_total",
    "session_http_requests_shed_total",
    "session_http_connections_closed_total",
    # worker, per process
    "session_flush_rows_total",
    "session_flush_batches_total",
    "session_flush_duration_seconds",
    "session_flush_failures_total",
    "session_flush_dead_letters_total",
    "session_flush_last_batch_rows",
    "session_worker_last_flush_timestamp_seconds",
    "session_worker_drain_paused",
    "session_worker_heartbeat_ok",
    "session_worker_arq_restarts_total",
    "session_sweeps_total",
    "session_evictions_total",
    "session_reconcile_resent_total",
}
HISTOGRAMS = {
    "session_http_request_duration_seconds",
    "session_redis_call_duration_seconds",
    "session_redis_pool_wait_seconds",
    "session_postgres_query_duration_seconds",
    "session_flush_duration_seconds",
}
