//! Reading folded-stack files (`frame;frame;… count`): ours, inferno's and FlameGraph's
//! collapse scripts, `perf script | inferno-collapse-perf`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context as _, Result, bail};

/// Merged folded stacks: path → summed count.
pub fn parse(text: &str) -> Result<BTreeMap<String, f64>> {
    let mut stacks = BTreeMap::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim_end();
        if line.trim().is_empty() {
            continue;
        }
        let Some((path, count)) = line.rsplit_once(' ') else {
            bail!("line {}: no count after the stack", number + 1);
        };
        let count: f64 = count
            .parse()
            .ok()
            .filter(|c: &f64| c.is_finite() && *c >= 0.0)
            .with_context(|| format!("line {}: {count:?} is not a count", number + 1))?;
        let path = path.trim();
        if path.is_empty() {
            bail!("line {}: empty stack", number + 1);
        }
        // A second count means a differential file, which is an output, not an input.
        if let Some((_, maybe_count)) = path.rsplit_once(' ')
            && maybe_count.parse::<f64>().is_ok()
        {
            bail!(
                "line {}: two counts (a differential folded file cannot be compared again)",
                number + 1
            );
        }
        *stacks.entry(path.to_string()).or_default() += count;
    }
    if stacks.is_empty() {
        bail!("no stacks in it");
    }
    Ok(stacks)
}

pub fn load(path: &Path) -> Result<BTreeMap<String, f64>> {
    let data = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let text = std::str::from_utf8(&data)
        .map_err(|_| anyhow::anyhow!("{} is not text (not a folded file)", path.display()))?;
    parse(text).with_context(|| format!("{} is not a valid folded file", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_and_accepts_fractional_counts() {
        let stacks = parse("a;b 3\na;b 2\n\na;c 1.5\n").unwrap();
        assert_eq!(stacks["a;b"], 5.0);
        assert_eq!(stacks["a;c"], 1.5);
    }

    #[test]
    fn frames_may_contain_spaces() {
        let stacks = parse("app;std::vec::Vec<T> as Drop;do it 7\n").unwrap();
        assert_eq!(stacks["app;std::vec::Vec<T> as Drop;do it"], 7.0);
    }

    #[test]
    fn refuses_broken_input() {
        assert!(parse("").is_err());
        assert!(parse("a;b\n").is_err());
        assert!(parse("a;b x\n").is_err());
        assert!(parse("a;b -3\n").is_err());
        assert!(parse("a;b 1 2\n").is_err());
        assert!(parse(" 4\n").is_err());
    }
}
