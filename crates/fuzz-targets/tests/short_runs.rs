//! A short run of every fuzz target: its seeds, then random mutations of them (bytes flipped,
//! inserted, deleted, duplicated, spliced from another seed, and the characters parsers trip on).
//! Seeded, so a failure replays; `OPTOUT_FUZZ_RUNS` sets the runs per target (default 20,000).
//! The long runs are cargo fuzz's (`fuzz/README.md`).

use optout_fuzz_targets::{TARGETS, run, seeds};

/// Bytes that matter to the parsers under test: brackets and escapes, quotes and backslashes,
/// protobuf varint continuation, invalid UTF-8.
const TOKENS: &[&[u8]] = &[
    b"[",
    b"]",
    b"[]",
    b"%",
    b"%5B",
    b"%5D",
    b"%ZZ",
    b"&",
    b"=",
    b"+",
    b"'",
    b"\\",
    b"\"",
    b"\0",
    b"\xff",
    b"\xc3",
    b"\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",
    b"{",
    b"}",
    b",",
    b"\n",
    b"data[",
    b"type=unsubscribe&",
    b"data[list_id]=",
    b"/",
];

fn mutate(rng: &mut fastrand::Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut data = input.to_vec();
    for _ in 0..rng.usize(1..=4) {
        let at = rng.usize(0..=data.len());
        match rng.u8(0..6) {
            0 if !data.is_empty() => {
                let index = rng.usize(0..data.len());
                data[index] ^= 1 << rng.u8(0..8);
            }
            1 => data.insert(at, rng.u8(..)),
            2 if at < data.len() => {
                let end = rng.usize(at..=data.len().min(at + 16));
                data.drain(at..end);
            }
            3 if at < data.len() => {
                let end = rng.usize(at..=data.len());
                let chunk = data[at..end].to_vec();
                data.splice(at..at, chunk);
            }
            4 if !other.is_empty() => {
                let start = rng.usize(0..other.len());
                let end = rng.usize(start..=other.len());
                data.splice(at..at, other[start..end].iter().copied());
            }
            _ => {
                let token = TOKENS[rng.usize(0..TOKENS.len())];
                data.splice(at..at, token.iter().copied());
            }
        }
    }
    data
}

#[test]
fn every_target_survives_a_short_run() {
    let runs: usize = std::env::var("OPTOUT_FUZZ_RUNS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(20_000);
    for target in TARGETS {
        let seeds = seeds(target);
        assert!(!seeds.is_empty(), "{target} has seeds");
        let mut rng = fastrand::Rng::with_seed(0x5eed_0000 + target.len() as u64);
        for seed in &seeds {
            assert!(run(target, seed));
        }
        // Mutations compound: each run mutates a seed or an earlier mutant.
        let mut pool = seeds.clone();
        for _ in 0..runs {
            let base = &pool[rng.usize(0..pool.len())];
            let other = &pool[rng.usize(0..pool.len())];
            let input = mutate(&mut rng, base, other);
            run(target, &input);
            if pool.len() < 256 && input.len() < 4096 {
                pool.push(input);
            }
        }
        println!(
            "{target}: {} seeds, {runs} mutated inputs, no failure",
            seeds.len()
        );
    }
}

#[test]
fn the_soql_oracle_sees_an_injection() {
    // What the `soql` target asserts would catch a builder that forgot to escape: the lexer reads
    // the injected text as more than the one value.
    let value = "x' OR Email != '";
    let unescaped = format!("SELECT Id FROM Contact WHERE Email = '{value}' AND IsDeleted = false");
    assert_ne!(
        optout_salesforce::soql::literals(&unescaped),
        Some(vec![value.to_owned()])
    );
    assert!(!run("no such target", b""));
}
