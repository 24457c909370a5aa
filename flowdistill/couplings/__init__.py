"""Teacher couplings for reflow and InstaFlow: generation (``generation``) and the job driver.

The on-disk store (manifest, shards, checksums, verified readers) is data and lives in
:mod:`flowdistill.data.couplings`; this package runs the teacher to fill it
(:func:`generate_couplings`, behind ``flowdistill couple``) and chains the stages
teacher → couplings → 2-rectified flow → couplings → InstaFlow student
(:mod:`flowdistill.couplings.pipeline`, imported on demand because it sits on the API layer).
"""

from flowdistill.couplings.generation import CoupleSpec, generate_couplings, shard_inputs, solve_teacher

__all__ = ["CoupleSpec", "generate_couplings", "shard_inputs", "solve_teacher"]
