//! Structured attributes of a robot description, read back from generated text, and per-attribute accuracy.
//!
//! # The optional per-row `attributes` field
//!
//! A dataset row may carry structured labels next to `messages` and `images`; LLaMA-Factory ignores unknown row
//! fields, so the same file trains there unchanged. `ferrotune eval` compares them with what it extracts from
//! each model's answer. Every key is optional; a row or key that is missing is simply not scored.
//!
//! ```json
//! "attributes": {"colour": "white", "head": "round", "arms": 2, "grippers": true, "locomotion": "wheels",
//!                "screen": true, "antenna": false, "background": "factory"}
//! ```
//!
//! | key | type | values the extractor recognises |
//! |---|---|---|
//! | `colour` | string | `white` `black` `red` `orange` `yellow` `green` `blue` `purple` (the body colour) |
//! | `head` | string | `round` `square` `triangular` `dome` |
//! | `arms` | integer | number of arms, 0–6 (the demo draws 0, 1, 2 or 4) |
//! | `grippers` | bool | the arms end in grippers (false when there are no arms) |
//! | `locomotion` | string | `wheels` `tracks` `two_legs` `four_legs` |
//! | `screen` | bool | a screen on the chest |
//! | `antenna` | bool | an antenna on the head |
//! | `background` | string | `factory` `lawn` `lab` `warehouse` `office` |
//!
//! Extraction reads Chinese and English alike, with the words of [`crate::demo::robots`]' descriptions and a few
//! common synonyms. For each attribute the phrase that occurs first in the text wins (so "没有显示屏" / "no screen"
//! beats the "显示屏" / "screen" inside it). Text that names no value gives `None`, shown as `none`, which counts
//! as wrong.

use std::sync::OnceLock;

use regex::Regex;
use serde::{Deserialize, Serialize};

/// Robot attributes; `None` is "not labelled" in a label and "not recognised" in a prediction.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attributes {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub colour: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arms: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grippers: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locomotion: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub screen: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub antenna: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub background: Option<String>,
}

/// The attribute keys, in report order.
pub const KEYS: [&str; 8] = ["colour", "head", "arms", "grippers", "locomotion", "screen", "antenna", "background"];

impl Attributes {
    /// The value of `key` as text (`"2"`, `"true"`, `"round"`), `None` when absent or for an unknown key.
    pub fn get(&self, key: &str) -> Option<String> {
        match key {
            "colour" => self.colour.clone(),
            "head" => self.head.clone(),
            "arms" => self.arms.map(|n| n.to_string()),
            "grippers" => self.grippers.map(|b| b.to_string()),
            "locomotion" => self.locomotion.clone(),
            "screen" => self.screen.map(|b| b.to_string()),
            "antenna" => self.antenna.map(|b| b.to_string()),
            "background" => self.background.clone(),
            _ => None,
        }
    }

    /// [`Attributes::get`], with `"none"` for a missing value (as reports show it).
    pub fn get_or_none(&self, key: &str) -> String {
        self.get(key).unwrap_or_else(|| "none".to_string())
    }
}

/// Accuracy of one attribute over the rows that label it.
#[derive(Debug, Clone, PartialEq)]
pub struct AttributeAccuracy {
    pub key: &'static str,
    pub correct: usize,
    pub total: usize,
}

impl AttributeAccuracy {
    /// Accuracy in percent (0 when nothing was labelled).
    pub fn percent(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            100.0 * self.correct as f64 / self.total as f64
        }
    }
}

/// Per-attribute accuracy of `predictions` against `labels` (paired by index; extra rows on either side are
/// ignored). Only attributes that at least one label carries are returned, in [`KEYS`] order. A prediction of
/// `None` is wrong.
pub fn accuracy(predictions: &[Attributes], labels: &[Attributes]) -> Vec<AttributeAccuracy> {
    KEYS.iter()
        .filter_map(|&key| {
            let (mut correct, mut total) = (0, 0);
            for (p, l) in predictions.iter().zip(labels) {
                if let Some(want) = l.get(key) {
                    total += 1;
                    if p.get(key).as_deref() == Some(want.as_str()) {
                        correct += 1;
                    }
                }
            }
            (total > 0).then_some(AttributeAccuracy { key, correct, total })
        })
        .collect()
}

/// A pattern and the value it stands for.
type Table = Vec<(Regex, &'static str)>;

struct Patterns {
    colour: Table,
    head: Table,
    arms: Table,
    grippers: Table,
    locomotion: Table,
    screen: Table,
    antenna: Table,
    background: Table,
}

fn table<S: AsRef<str>>(rows: &[(S, &'static str)]) -> Table {
    // The patterns are literals of this file; a typo fails every extraction test at once.
    rows.iter()
        .map(|(p, v)| (Regex::new(&format!("(?i){}", p.as_ref())).expect("valid attribute pattern"), *v))
        .collect()
}

fn patterns() -> &'static Patterns {
    static P: OnceLock<Patterns> = OnceLock::new();
    P.get_or_init(|| {
        // Numbers as words: Chinese (一/二/两/单/双…) and English, for arms and legs.
        let n1 = r"(?:一|单|1|\bone|\ba single|\ban?)";
        let n2 = r"(?:二|两|双|2|\btwo|\ba pair of)";
        let n3 = r"(?:三|3|\bthree)";
        let n4 = r"(?:四|4|\bfour)";
        let n5 = r"(?:五|5|\bfive)";
        let n6 = r"(?:六|6|\bsix)";
        let arm_zh = r"\s*(?:只|条|个|根|支)?\s*(?:机械)?(?:手)?臂";
        let arm_en = r"\s+(?:[a-z-]+\s+)?arms?\b";
        let leg_zh = r"\s*(?:条|只)?\s*(?:机械)?腿";
        let leg_en = r"\s+(?:[a-z-]+\s+)?legs?\b";
        let arms: Vec<(String, &str)> = vec![
            (r"(?:没有|无)(?:任何)?(?:机械)?(?:手)?臂|\bno\s+(?:[a-z-]+\s+)?arms\b|\bwithout\s+arms\b|\barmless\b".into(), "0"),
            (format!("(?:{n1}{arm_zh}|单臂|{n1}{arm_en})"), "1"),
            (format!("(?:{n2}{arm_zh}|双臂|{n2}{arm_en})"), "2"),
            (format!("(?:{n3}{arm_zh}|{n3}{arm_en})"), "3"),
            (format!("(?:{n4}{arm_zh}|{n4}{arm_en})"), "4"),
            (format!("(?:{n5}{arm_zh}|{n5}{arm_en})"), "5"),
            (format!("(?:{n6}{arm_zh}|{n6}{arm_en})"), "6"),
        ];
        let loco: Vec<(String, &str)> = vec![
            (r"轮子|轮式|车轮|\bwheel(?:s|ed)?\b".into(), "wheels"),
            (r"履带|\btracks?\b|\btracked\b|\bcaterpillars?\b|\btreads?\b".into(), "tracks"),
            (format!("{n2}{leg_zh}|双足|两足|{n2}{leg_en}|\\bbiped(?:al)?\\b|\\btwo-legged\\b"), "two_legs"),
            (format!("{n4}{leg_zh}|四足|{n4}{leg_en}|\\bquadruped(?:al)?\\b|\\bfour-legged\\b"), "four_legs"),
        ];
        Patterns {
            colour: table(&[
                (r"白色|\bwhite\b", "white"),
                (r"黑色|\bblack\b", "black"),
                (r"红色|\bred\b", "red"),
                (r"橙色|橘色|橘黄色|\borange\b", "orange"),
                (r"黄色|\byellow\b", "yellow"),
                (r"绿色|\bgreen\b", "green"),
                (r"蓝色|\bblue\b", "blue"),
                (r"紫色|\bpurple\b|\bviolet\b", "purple"),
            ]),
            head: table(&[
                (r"圆形|圆头|球形|\bround\b|\bcircular\b|\bspherical\b", "round"),
                (r"方形|方头|\bsquare\b|\brectangular\b|\bboxy\b", "square"),
                (r"三角形|三角|\btriangular\b|\btriangle\b", "triangular"),
                (r"半球形|半圆形|圆顶|穹顶|\bdome(?:-shaped|d)?\b|\bhemispherical\b", "dome"),
            ]),
            arms: table(&arms),
            grippers: table(&[
                (r"(?:没有|无)(?:机械)?(?:夹爪|爪子|抓手)|\bwithout\s+(?:an?\s+)?(?:grippers?|claws?)|\bno\s+(?:grippers?|claws?)\b", "false"),
                (r"夹爪|爪子|抓手|\bgrippers?\b|\bclaws?\b|\bpincers?\b", "true"),
            ]),
            locomotion: table(&loco),
            screen: table(&[
                (r"(?:没有|无)(?:显示屏|屏幕|显示器)|\bno\s+(?:[a-z-]+\s+)?(?:screens?|displays?)\b|\bwithout\s+(?:an?\s+)?(?:screens?|displays?)\b", "false"),
                (r"显示屏|屏幕|显示器|\bscreens?\b|\bdisplays?\b", "true"),
            ]),
            antenna: table(&[
                (r"(?:没有|无)天线|\bno\s+antenn(?:a|ae|as)\b|\bwithout\s+(?:an\s+)?antenn(?:a|ae|as)\b", "false"),
                (r"天线|\bantenn(?:a|ae|as)\b", "true"),
            ]),
            background: table(&[
                (r"工厂|车间|\bfactory\b|\bworkshop\b", "factory"),
                (r"草坪|草地|户外|\blawn\b|\bgrass\b|\boutdoors?\b", "lawn"),
                (r"实验室|\blab(?:oratory)?\b", "lab"),
                (r"仓库|\bwarehouse\b", "warehouse"),
                (r"办公室|\boffice\b", "office"),
            ]),
        }
    })
}

/// The value whose pattern matches earliest in `text` (the longer match on a tie).
fn first_match(table: &Table, text: &str) -> Option<&'static str> {
    table
        .iter()
        .filter_map(|(re, v)| re.find(text).map(|m| (m.start(), std::cmp::Reverse(m.len()), *v)))
        .min()
        .map(|(_, _, v)| v)
}

/// Reads the attributes stated in a description (Chinese or English).
pub fn extract(text: &str) -> Attributes {
    let p = patterns();
    let s = |t: &Table| first_match(t, text).map(str::to_string);
    let b = |t: &Table| first_match(t, text).map(|v| v == "true");
    let arms = first_match(&p.arms, text).and_then(|v| v.parse().ok());
    // A robot said to have no arms has no grippers either.
    let grippers = b(&p.grippers).or(if arms == Some(0) { Some(false) } else { None });
    Attributes {
        colour: s(&p.colour),
        head: s(&p.head),
        arms,
        grippers,
        locomotion: s(&p.locomotion),
        screen: b(&p.screen),
        antenna: b(&p.antenna),
        background: s(&p.background),
    }
}
