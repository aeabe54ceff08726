"""What several test tiers share: real servers in threads and processes, blob servers, ports."""
