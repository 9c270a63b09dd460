//! Every limit Mandate enforces on its registry, as named constants. Each one is documented in
//! `docs/architecture.md`; raising one is a compatibility decision, not a tweak.

/// Longest agent name, in bytes.
pub const AGENT_NAME_BYTES_MAX: usize = 64;
/// Longest user id (an agent's owner), in bytes.
pub const USER_ID_BYTES_MAX: usize = 128;
/// Longest agent description, in bytes.
pub const DESCRIPTION_BYTES_MAX: usize = 1024;
/// Longest model or provider string, in bytes.
pub const MODEL_BYTES_MAX: usize = 128;
/// Most labels on one agent.
pub const LABELS_PER_AGENT_MAX: usize = 32;
/// Longest label key, in bytes.
pub const LABEL_KEY_BYTES_MAX: usize = 63;
/// Longest label value, in bytes.
pub const LABEL_VALUE_BYTES_MAX: usize = 255;
/// Most public keys registered on one agent at once.
pub const KEYS_PER_AGENT_MAX: usize = 8;
/// Longest key id (`kid`), in bytes.
pub const KID_BYTES_MAX: usize = 128;
/// Largest agent ceiling (a policy text), in bytes.
pub const CEILING_BYTES_MAX: usize = 64 * 1024;
/// Longest operator token name, in bytes.
pub const TOKEN_NAME_BYTES_MAX: usize = 128;
/// Largest page a list call returns.
pub const LIST_PAGE_SIZE_MAX: u32 = 1000;
/// Page size when the caller asks for none.
pub const LIST_PAGE_SIZE_DEFAULT: u32 = 100;
/// Most commands in one batch (one raft log entry).
pub const BATCH_COMMANDS_MAX: usize = 512;
