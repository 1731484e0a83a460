//! Reading data files: a JSON array of rows or JSON lines, each row remembering its index and line so that
//! every message can point at it. Malformed JSON is an error with file:line:column and a likely fix.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::Value;

/// One row of a data file.
#[derive(Clone, Debug)]
pub struct Row {
    pub value: Value,
    /// 0-based position in the file (`data[index]` in Python).
    pub index: usize,
    /// 1-based line where the row starts.
    pub line: usize,
}

/// The rows of a `.json` (array, or JSON lines as the `datasets` loader also accepts) or `.jsonl` file.
pub fn read_rows(path: &Path) -> Result<Vec<Row>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    // Editors on Windows often write a byte-order mark, which JSON parsers reject.
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let is_jsonl = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("jsonl"));
    if !is_jsonl {
        match serde_json::from_str::<Value>(text) {
            Ok(Value::Array(items)) => {
                let lines = LineIndex::new(text);
                let offsets = array_element_offsets(text);
                return Ok(items
                    .into_iter()
                    .enumerate()
                    .map(|(index, value)| {
                        let line = offsets.get(index).map(|o| lines.line_of(*o)).unwrap_or(1);
                        Row { value, index, line }
                    })
                    .collect());
            }
            Ok(_) if !looks_like_json_lines(text) => {
                anyhow::bail!(
                    "{}: expected a list of rows `[{{...}}, {{...}}]` (or one object per line in a .jsonl file)",
                    path.display()
                );
            }
            // Several objects one per line in a .json file: read as JSON lines, as `datasets` does.
            Ok(_) => {}
            Err(_) if looks_like_json_lines(text) => {}
            Err(e) => return Err(json_error(path, text, &e)),
        }
    }
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line).map_err(|e| {
            anyhow::anyhow!(
                "{}:{}:{}: invalid JSON in this line: {}\n  hint: {}",
                path.display(),
                i + 1,
                e.column(),
                strip_position(&e),
                fix_hint(&e, true)
            )
        })?;
        rows.push(Row { value, index: rows.len(), line: i + 1 });
    }
    Ok(rows)
}

/// A text whose first line is a complete JSON value and which has a second non-empty line.
fn looks_like_json_lines(text: &str) -> bool {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let first_ok = lines.next().is_some_and(|l| serde_json::from_str::<Value>(l).is_ok_and(|v| v.is_object()));
    first_ok && lines.next().is_some()
}

/// The error for malformed JSON: file:line:column, what is wrong, and the likely fix.
pub fn json_error(path: &Path, text: &str, e: &serde_json::Error) -> anyhow::Error {
    let line_text = text.lines().nth(e.line().saturating_sub(1)).unwrap_or("");
    let excerpt: String = line_text.chars().take(100).collect();
    anyhow::anyhow!(
        "{}:{}:{}: invalid JSON: {}\n  {}| {}\n  hint: {}",
        path.display(),
        e.line(),
        e.column(),
        strip_position(e),
        e.line(),
        excerpt,
        fix_hint(e, false)
    )
}

/// serde_json's message without its trailing " at line L column C" (the place is already in front).
fn strip_position(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

fn fix_hint(e: &serde_json::Error, one_line: bool) -> &'static str {
    let msg = e.to_string();
    if e.is_eof() {
        if one_line {
            "the line ends early: each line of a .jsonl file must be one complete object"
        } else {
            "the file ends early: a closing `]` or `}` (or a quote) is missing"
        }
    } else if msg.contains("trailing comma") {
        "JSON allows no comma after the last item of a list or object; delete it"
    } else if msg.contains("key must be a string") {
        "object keys need double quotes: {\"images\": [...]}"
    } else if msg.contains("control character") {
        "a string contains a raw line break or tab; write it as \\n or \\t"
    } else if msg.contains("expected `,` or `]`") || msg.contains("expected `,` or `}`") {
        "a comma is missing between two items, or a bracket is not closed, just before this place"
    } else if msg.contains("invalid escape") {
        "a backslash starts an invalid escape; Windows paths need \\\\ or forward slashes"
    } else if msg.contains("expected value") {
        "a value is missing or not JSON here (strings need double quotes; use true/false/null, not True/None)"
    } else if msg.contains("trailing characters") {
        "there is text after the end of the JSON value; a .json file holds one list `[...]`"
    } else {
        "check the JSON syntax at this place (e.g. with `python -m json.tool FILE`)"
    }
}

/// Byte offsets where the elements of a top-level JSON array start (the text is known to be valid JSON).
fn array_element_offsets(text: &str) -> Vec<usize> {
    let bytes = text.as_bytes();
    let mut offsets = Vec::new();
    let Some(open) = bytes.iter().position(|b| !b.is_ascii_whitespace()) else { return offsets };
    if bytes[open] != b'[' {
        return offsets;
    }
    let (mut depth, mut in_string, mut escape, mut expect) = (1usize, false, false, true);
    for (i, &c) in bytes.iter().enumerate().skip(open + 1) {
        if in_string {
            if escape {
                escape = false;
            } else if c == b'\\' {
                escape = true;
            } else if c == b'"' {
                in_string = false;
            }
            continue;
        }
        if c.is_ascii_whitespace() {
            continue;
        }
        let starts_value = !matches!(c, b',' | b']' | b'}');
        if depth == 1 && expect && starts_value {
            offsets.push(i);
            expect = false;
        }
        match c {
            b'"' => in_string = true,
            b'[' | b'{' => depth += 1,
            b']' | b'}' => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            b',' if depth == 1 => expect = true,
            _ => {}
        }
    }
    offsets
}

/// Byte offset → 1-based line number.
struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    fn new(text: &str) -> Self {
        let mut starts = vec![0];
        starts.extend(text.bytes().enumerate().filter(|(_, b)| *b == b'\n').map(|(i, _)| i + 1));
        Self { starts }
    }

    fn line_of(&self, offset: usize) -> usize {
        self.starts.partition_point(|&s| s <= offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("ferrotune-read-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn rows_know_their_lines() {
        let p =
            write("a.json", "[\n  {\"a\": \"[x]\"},\n  {\"a\": 2,\n   \"b\": {\"c\": [1, 2]}},\n\n  {\"a\": 3}\n]\n");
        let rows = read_rows(&p).unwrap();
        assert_eq!(rows.iter().map(|r| r.line).collect::<Vec<_>>(), vec![2, 3, 6]);
    }

    #[test]
    fn json_lines() {
        let p = write("b.jsonl", "{\"a\": 1}\n\n{\"a\": 2}\n");
        let rows = read_rows(&p).unwrap();
        assert_eq!((rows.len(), rows[1].line, rows[1].index), (2, 3, 1));
        let p = write("c.json", "{\"a\": 1}\n{\"a\": 2}\n");
        assert_eq!(read_rows(&p).unwrap().len(), 2);
    }

    #[test]
    fn bad_json_names_line_and_column() {
        let p = write("d.json", "[\n  {\"a\": 1}\n  {\"a\": 2}\n]\n");
        let err = read_rows(&p).unwrap_err().to_string();
        assert!(err.contains("d.json:3:3"), "{err}");
        assert!(err.contains("comma is missing"), "{err}");
        let p = write("e.json", "[{\"a\": 1},]");
        let err = read_rows(&p).unwrap_err().to_string();
        assert!(err.contains("e.json:1:") && err.contains("delete it"), "{err}");
        let p = write("f.jsonl", "{\"a\": 1}\n{\"a\": }\n");
        let err = read_rows(&p).unwrap_err().to_string();
        assert!(err.contains("f.jsonl:2:7"), "{err}");
    }
}
