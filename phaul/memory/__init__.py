"""How a container's memory reaches the destination.

- `methods`: one class per memory method (stop-and-copy, page-delta and
  soft-dirty pre-copy) behind `MemoryMethod`.
- `policy`: which method runs, the convergence policy that ends pre-copy, and
  the destination's measured restore costs.
- `rounds`: driving a method's pre-copy rounds under the policy.
- `page_delta`: page deltas between dumps, made on the source, applied on the
  destination.
- `page_stream`: the stream that carries the final page delta while frozen.
"""
