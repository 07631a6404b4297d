"""Training: loss, optimizer, sharded state, the jitted step and the loop."""
