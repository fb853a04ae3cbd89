"""What an operator runs and watches beside the API: the metric recorder, the process supervisor, the
Consul registration. Depends only on the base modules (settings, errors, process)."""
