//! Salesforce record ids: 18 characters, a 3-character key prefix per object, and the
//! case-safe 3-character suffix real orgs append to the 15-character case-sensitive id.
//! The sandbox encodes a record's position in the store into the id, so lookups need no map.

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const SUFFIX_ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ012345";
/// Pod/instance-like characters between the key prefix and the sequence.
const MIDDLE: &str = "8d0";
const SEQUENCE_LEN: usize = 9;

/// Formats the 18-character id of the record at `index` with the object's key `prefix`.
pub(crate) fn format_id(prefix: &str, index: u64) -> String {
    let mut sequence = [b'0'; SEQUENCE_LEN];
    let mut rest = index;
    for slot in sequence.iter_mut().rev() {
        *slot = BASE62[(rest % 62) as usize];
        rest /= 62;
    }
    let mut id = String::with_capacity(18);
    id.push_str(prefix);
    id.push_str(MIDDLE);
    id.extend(sequence.iter().map(|&byte| byte as char));
    let suffix = case_safe_suffix(&id);
    id.push_str(&suffix);
    id
}

/// The three characters that make a 15-character id unique without regard to case.
pub(crate) fn case_safe_suffix(id15: &str) -> String {
    let bytes = id15.as_bytes();
    (0..3)
        .map(|chunk| {
            let mut bits = 0usize;
            for position in 0..5 {
                if bytes
                    .get(chunk * 5 + position)
                    .is_some_and(u8::is_ascii_uppercase)
                {
                    bits |= 1 << position;
                }
            }
            SUFFIX_ALPHABET[bits] as char
        })
        .collect()
}

/// Reads the store index back out of a 15- or 18-character id with the given key `prefix`.
pub(crate) fn parse_id(prefix: &str, id: &str) -> Option<u64> {
    if !(id.len() == 15 || id.len() == 18) || !id.is_ascii() || !id.starts_with(prefix) {
        return None;
    }
    if &id[3..6] != MIDDLE {
        return None;
    }
    let mut index: u64 = 0;
    for byte in id[6..15].bytes() {
        let digit = BASE62.iter().position(|&candidate| candidate == byte)? as u64;
        index = index.checked_mul(62)?.checked_add(digit)?;
    }
    if id.len() == 18 && !id[15..].eq_ignore_ascii_case(&case_safe_suffix(&id[..15])) {
        return None;
    }
    Some(index)
}

/// A random alphanumeric string, for tokens, locators and job ids.
pub(crate) fn random_alphanumeric(len: usize) -> String {
    (0..len)
        .map(|_| BASE62[fastrand::usize(..62)] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_both_lengths() {
        for index in [0u64, 1, 61, 62, 999_999, 12_345_678] {
            let id = format_id("003", index);
            assert_eq!(id.len(), 18);
            assert_eq!(parse_id("003", &id), Some(index));
            assert_eq!(parse_id("003", &id[..15]), Some(index));
            assert_eq!(parse_id("00Q", &id), None);
        }
    }

    #[test]
    fn suffix_matches_the_documented_algorithm() {
        // Worked by hand: A at position 4 of chunk one, V at position 2 of chunk three.
        assert_eq!(case_safe_suffix("001A0000006Vm9r"), "IAC");
    }
}
