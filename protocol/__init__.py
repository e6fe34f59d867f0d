"""What the agent and the push service share: ids, topics, messages, policy."""
