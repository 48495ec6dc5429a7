//! Scripted answers: the stable hash that puts an execution in a failure-ratio bucket,
//! and the execution-id prefixes (`eNNN-`, `flaky-`, `flakyK-`, `slow-MS-`) that choose
//! an answer outright.

use std::time::Duration;

use super::args::{MAX_FLAKY, MAX_STATUS, MIN_STATUS, Outcome};

// ---------------------------------------------------------------------------------------
// Stable hashing
// ---------------------------------------------------------------------------------------

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash
}

/// MurmurHash3's 64-bit finaliser: spreads FNV's low-bit differences over all bits.
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

/// Stable hash of an execution: FNV-1a over each id preceded by its length, then `fmix64`.
/// Never change it: tests and benchmarks rely on executions keeping their buckets.
pub(super) fn execution_hash(project_id: &str, workflow_id: &str, execution_id: &str) -> u64 {
    let mut h = FNV_OFFSET;
    for part in [project_id, workflow_id, execution_id] {
        h = fnv1a(h, &(part.len() as u64).to_le_bytes());
        h = fnv1a(h, part.as_bytes());
    }
    fmix64(h)
}

/// Maps a hash to [0, 1) using its top 53 bits.
pub(super) fn unit_interval(hash: u64) -> f64 {
    (hash >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

// ---------------------------------------------------------------------------------------
// Scripted prefixes
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Script {
    /// No scripted prefix: the failure ratios decide.
    None,
    Answer(Outcome),
    /// Wait this much more, then 200.
    Slow(Duration),
}

/// The digits at the start of `s`, when they are followed by `-` or nothing.
fn leading_number(s: &str) -> Option<&str> {
    let end = s.bytes().take_while(u8::is_ascii_digit).count();
    let (digits, rest) = s.split_at(end);
    (end > 0 && (rest.is_empty() || rest.starts_with('-'))).then_some(digits)
}

/// Reads the execution id's scripted prefix; `Err` for a prefix that is malformed.
pub(super) fn parse_script(execution_id: &str) -> Result<Script, &'static str> {
    if let Some(rest) = execution_id.strip_prefix('e')
        && let Some(digits) = leading_number(rest).filter(|d| d.len() == 3)
    {
        return match digits.parse::<u16>() {
            Ok(s) if (MIN_STATUS..=MAX_STATUS).contains(&s) => {
                Ok(Script::Answer(Outcome::Status(s)))
            }
            _ => Err("the scripted status of an `eNNN-` execution_id must be 200..=599"),
        };
    }
    if let Some(rest) = execution_id.strip_prefix("flaky") {
        if rest.is_empty() || rest.starts_with('-') {
            return Ok(Script::Answer(Outcome::Flaky(1)));
        }
        if let Some(digits) = leading_number(rest) {
            return match digits.parse::<u32>() {
                Ok(k) if (1..=MAX_FLAKY).contains(&k) => Ok(Script::Answer(Outcome::Flaky(k))),
                _ => Err("the failure count of a `flakyK-` execution_id must be 1..=99"),
            };
        }
    }
    if let Some(rest) = execution_id.strip_prefix("slow-")
        && let Some(digits) = leading_number(rest)
    {
        return match digits.parse::<u64>() {
            Ok(ms) => Ok(Script::Slow(Duration::from_millis(ms))),
            Err(_) => Err("the delay of a `slow-MS-` execution_id is too large"),
        };
    }
    Ok(Script::None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::stats::execution_key;

    const PROJECT: &str = "0123456789abcdef0123456789abcdef";

    // ----- hashing -----

    #[test]
    fn fnv1a_matches_reference_vectors() {
        assert_eq!(fnv1a(FNV_OFFSET, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(FNV_OFFSET, b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn execution_hash_is_pinned() {
        // Pinned so that a change of the algorithm (which would move executions between
        // buckets across versions) is noticed.
        let h = execution_hash(PROJECT, "wf", "exec-1");
        assert_eq!(h, PINNED_HASH, "{h:#x}");
        // Ids are length-delimited: moving a character between ids changes the hash.
        assert_ne!(
            execution_hash("ab", "c", "d"),
            execution_hash("a", "bc", "d")
        );
        assert_ne!(execution_key("ab", "c", "d"), execution_key("a", "bc", "d"));
        assert_ne!(execution_key("a", "b", "cd"), execution_key("a", "bc", "d"));
    }

    const PINNED_HASH: u64 = 0x9f35_0f41_4976_9705;

    // ----- scripted prefixes -----

    #[test]
    fn parses_scripts() {
        use Outcome::*;
        assert_eq!(parse_script("e404-x"), Ok(Script::Answer(Status(404))));
        assert_eq!(parse_script("e302"), Ok(Script::Answer(Status(302))));
        assert!(parse_script("e099-x").is_err());
        assert!(parse_script("e600-x").is_err());
        assert_eq!(parse_script("e4044-x"), Ok(Script::None));
        assert_eq!(parse_script("e40-x"), Ok(Script::None));
        assert_eq!(parse_script("exec-1"), Ok(Script::None));
        assert_eq!(parse_script("flaky-x"), Ok(Script::Answer(Flaky(1))));
        assert_eq!(parse_script("flaky3-x"), Ok(Script::Answer(Flaky(3))));
        assert_eq!(parse_script("flaky99"), Ok(Script::Answer(Flaky(99))));
        assert!(parse_script("flaky0-x").is_err());
        assert!(parse_script("flaky100-x").is_err());
        assert_eq!(parse_script("flakyness"), Ok(Script::None));
        assert_eq!(
            parse_script("slow-3000-x"),
            Ok(Script::Slow(Duration::from_secs(3)))
        );
        assert_eq!(parse_script("slow-x"), Ok(Script::None));
        assert!(parse_script("slow-99999999999999999999999-x").is_err());
        assert_eq!(parse_script("é404-x"), Ok(Script::None));
    }
}
