"""expertcache serve: continuous batching (batcher), admission order (scheduler), the HTTP API
(app) and its metrics."""
