"""How memory travels: the memory methods, the pre-copy policy, page deltas and the page stream."""
