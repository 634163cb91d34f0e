"""The notifier service: webhooks (retries, HMAC), ntfy, alert channels."""
