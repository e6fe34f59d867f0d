"""The terminal agent: config, fusion, publisher, receiver and the mailpush-agent CLI."""
