//! What keeps a step's memory bounded: the one checkpointed chain (`checkpoint`: keep each
//! segment's input, recompute one segment with a graph on the way back) and row strips
//! (`strips`: a tensor held as strips so that no buffer passes the adapter's binding limit).
//! Generic over what the segments compute: the models hand their blocks in as closures.
//! May use: `ops` and the foundation.

pub mod checkpoint;
pub mod strips;
