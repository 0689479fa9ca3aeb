//! Writes each target's seeds to `DIR/<target>/seed-N`, the layout cargo fuzz reads a corpus from.

fn main() -> std::io::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "fuzz/corpus".to_owned());
    for target in optout_fuzz_targets::TARGETS {
        let folder = std::path::Path::new(&dir).join(target);
        std::fs::create_dir_all(&folder)?;
        for (index, seed) in optout_fuzz_targets::seeds(target).iter().enumerate() {
            std::fs::write(folder.join(format!("seed-{index}")), seed)?;
        }
    }
    Ok(())
}
