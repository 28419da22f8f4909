//! Generation: a preallocated KV cache, batched decoding of prompts of different lengths,
//! seeded sampling, stop conditions, streaming steps, and the persona hooks in the hot loop.

pub mod events;
pub mod sampling;
pub mod scheduler;
mod sequence;
pub mod session;

pub use events::{AuditFsync, AuditLog, AuditSpec, Event, EventKind};
pub use sampling::{token_logprobs, Sampler, SamplingParams, TokenLogprobs};
pub use scheduler::{AlertPolicy, RequestUpdate, Scheduler, SchedulerConfig, SchedulerStats};
pub use session::{FinishReason, GenerateParams, SequenceResult, Session, StepOutput};
