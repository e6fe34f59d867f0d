"""The push service: mailbox watchers, registry, router, outbox and the mailpush-server CLI."""
