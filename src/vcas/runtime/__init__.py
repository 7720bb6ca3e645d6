"""What the installed hooks and ops read at backward time, owned by one controller."""
