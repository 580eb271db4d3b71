"""axme-fw: an egress firewall and kill switch for AI agents."""
