"""Everything about serving: settings, the HTTP app, batching, batch jobs, storage and the CLI."""
