"""libvirt integration: the hook, the agent, and attach/detach by virDomain."""
