"""Model monitoring: reference and window profiles of inference records, and drift statistics over them."""
