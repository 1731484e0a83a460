//! "Did you mean" suggestions for keys, dataset names and template names.

/// The candidates close enough to `word` to be what the user meant, best first (at most three).
///
/// Close means an edit distance of at most a third of the word's length (at least 2), or one name containing
/// the other (`rank` → `lora_rank`).
pub fn similar<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    let lower = word.to_lowercase();
    let limit = (lower.chars().count() / 3).max(2);
    let mut scored: Vec<(usize, &str)> = candidates
        .into_iter()
        .filter_map(|c| {
            // Levenshtein distance by characters (not bytes), so a CJK typo counts once.
            let d = strsim::levenshtein(&lower, &c.to_lowercase());
            let contains = lower.len() >= 4 && (c.contains(lower.as_str()) || lower.contains(c));
            (d <= limit || contains).then_some((d, c))
        })
        .collect();
    scored.sort();
    scored.dedup();
    scored.into_iter().take(3).map(|(_, c)| c).collect()
}

/// `"; did you mean `a`?"`-style hint text, or an empty string when nothing is close.
pub fn hint<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    let s = similar(word, candidates);
    match s.as_slice() {
        [] => String::new(),
        [one] => format!("did you mean `{one}`?"),
        many => {
            let list: Vec<String> = many.iter().map(|c| format!("`{c}`")).collect();
            format!("did you mean one of {}?", list.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distance() {
        assert_eq!(strsim::levenshtein("kitten", "sitting"), 3);
        assert_eq!(strsim::levenshtein("", "abc"), 3);
        assert_eq!(strsim::levenshtein("lora_rank", "lora_rank"), 0);
    }

    #[test]
    fn suggestions() {
        let keys = ["learning_rate", "lora_rank", "lora_alpha", "logging_steps"];
        assert_eq!(similar("learning_rat", keys), vec!["learning_rate"]);
        assert_eq!(similar("lora_rnak", keys), vec!["lora_rank"]);
        assert_eq!(similar("alpca_en_demo", ["alpaca_en_demo", "identity"]), vec!["alpaca_en_demo"]);
        assert!(similar("zzz", keys).is_empty());
    }
}
