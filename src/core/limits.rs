//! Bounds on incoming entries, set per replica.

/// Bounds on incoming entries; anything beyond them is dead-lettered as `invalid`.
#[derive(clap::Args, Clone, Debug)]
pub struct Limits {
    #[arg(long, env = "GE_MAX_PAYLOAD_BYTES", default_value_t = 1 << 20)]
    pub max_payload_bytes: usize,
    /// Any field other than `payload`.
    #[arg(long, env = "GE_MAX_FIELD_BYTES", default_value_t = 64 << 10)]
    pub max_field_bytes: usize,
    #[arg(long, env = "GE_MAX_FIELDS", default_value_t = 256)]
    pub max_fields: usize,
    #[arg(long, env = "GE_MAX_DEPENDS_ON", default_value_t = 1000)]
    pub max_depends_on: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_payload_bytes: 1 << 20, max_field_bytes: 64 << 10, max_fields: 256, max_depends_on: 1000 }
    }
}
