//! `dataset_info.json` (LLaMA-Factory's `data/parser.py::DatasetAttr`) for local `file_name` sources, and the
//! resolution of the `dataset` key's names: a registered name, or a data file path given directly.
//!
//! As in LLaMA-Factory, a `columns` block replaces all default column names (unlisted ones become unset) and a
//! `tags` block replaces all default tags. Deviation: when there is no `tags` block and the rows' messages use
//! `role`/`content` (OpenAI style, as the reference run's data does), they are read with role/content tags
//! instead of failing every row (see [`super::convert`]).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};

use super::read::json_error;
use crate::suggest;

/// The file name LLaMA-Factory looks for in `dataset_dir`.
pub const DATASET_INFO: &str = "dataset_info.json";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Formatting {
    Alpaca,
    Sharegpt,
    Openai,
}

impl Formatting {
    pub fn name(self) -> &'static str {
        match self {
            Formatting::Alpaca => "alpaca",
            Formatting::Sharegpt => "sharegpt",
            Formatting::Openai => "openai",
        }
    }
}

/// Column names in the rows (`None`: the column is not used).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Columns {
    pub prompt: Option<String>,
    pub query: Option<String>,
    pub response: Option<String>,
    pub history: Option<String>,
    pub messages: Option<String>,
    pub system: Option<String>,
    pub tools: Option<String>,
    pub images: Option<String>,
    pub videos: Option<String>,
    pub audios: Option<String>,
}

impl Default for Columns {
    fn default() -> Self {
        Self {
            prompt: Some("instruction".into()),
            query: Some("input".into()),
            response: Some("output".into()),
            history: None,
            messages: Some("conversations".into()),
            system: None,
            tools: None,
            images: None,
            videos: None,
            audios: None,
        }
    }
}

/// ShareGPT message tags (`None`: that role is not accepted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tags {
    pub role: Option<String>,
    pub content: Option<String>,
    pub user: Option<String>,
    pub assistant: Option<String>,
    pub observation: Option<String>,
    pub function: Option<String>,
    pub system: Option<String>,
}

impl Default for Tags {
    fn default() -> Self {
        Self {
            role: Some("from".into()),
            content: Some("value".into()),
            user: Some("human".into()),
            assistant: Some("gpt".into()),
            observation: Some("observation".into()),
            function: Some("function_call".into()),
            system: Some("system".into()),
        }
    }
}

impl Tags {
    /// The tags for OpenAI-style messages (`role`/`content`, `user`/`assistant`/`system`), used when rows use
    /// them and dataset_info.json has no `tags` block.
    pub fn openai() -> Self {
        Self {
            role: Some("role".into()),
            content: Some("content".into()),
            user: Some("user".into()),
            assistant: Some("assistant".into()),
            observation: Some("observation".into()),
            function: Some("function_call".into()),
            system: Some("system".into()),
        }
    }
}

/// One dataset to load.
#[derive(Clone, Debug)]
pub struct DatasetAttr {
    /// The name as given in the config.
    pub name: String,
    /// The data files (one, or the files of a folder, sorted).
    pub files: Vec<PathBuf>,
    pub formatting: Formatting,
    /// `num_samples`: draw this many rows (with replacement beyond the row count).
    pub num_samples: Option<usize>,
    pub columns: Columns,
    pub tags: Tags,
    /// dataset_info.json had a `tags` block (so no role/content detection).
    pub tags_given: bool,
    /// How the entry was found, for the report ("dataset_info.json" or "file path").
    pub origin: String,
}

/// Reads `<dataset_dir>/dataset_info.json`; `Ok(None)` when it does not exist.
pub fn read_dataset_info(dataset_dir: &Path) -> Result<Option<(PathBuf, Map<String, Value>)>> {
    let path = dataset_dir.join(DATASET_INFO);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("{}: cannot read", path.display())),
    };
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let v: Value = serde_json::from_str(text).map_err(|e| json_error(&path, text, &e))?;
    match v {
        Value::Object(m) => Ok(Some((path, m))),
        _ => bail!("{}: expected an object of `\"name\": {{...}}` dataset entries", path.display()),
    }
}

/// Resolves the `dataset` (or `eval_dataset`) names against `dataset_dir`.
pub fn resolve(names: &[String], dataset_dir: &Path) -> Result<Vec<DatasetAttr>> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let info = read_dataset_info(dataset_dir)?;
    names.iter().map(|n| resolve_one(n, dataset_dir, info.as_ref())).collect()
}

fn resolve_one(name: &str, dataset_dir: &Path, info: Option<&(PathBuf, Map<String, Value>)>) -> Result<DatasetAttr> {
    if let Some((info_path, map)) = info {
        if let Some(entry) = map.get(name) {
            return parse_entry(name, entry, info_path, dataset_dir);
        }
    }
    // A data file or folder given directly (LLaMA-Factory only accepts registered names; users pass paths).
    for candidate in [PathBuf::from(name), dataset_dir.join(name)] {
        if candidate.exists() && (candidate.is_dir() || is_data_file(&candidate)) {
            return direct_path(name, &candidate);
        }
    }
    match info {
        Some((info_path, map)) => {
            let hint = suggest::hint(name, map.keys().map(String::as_str));
            let mut names: Vec<&str> = map.keys().map(String::as_str).collect();
            names.truncate(20);
            bail!(
                "dataset `{name}` is not defined in {} and is not a data file{}\n  defined: {}{}",
                info_path.display(),
                if hint.is_empty() { String::new() } else { format!("\n  hint: {hint}") },
                names.join(", "),
                if map.len() > 20 { ", ..." } else { "" }
            )
        }
        None => bail!(
            "dataset `{name}`: there is no {} in dataset_dir {} and no file of that name\n  hint: dataset_dir is \
             relative to the working directory ({}); set `dataset_dir` to the folder that holds {}, or give the \
             data file's path",
            DATASET_INFO,
            dataset_dir.display(),
            std::env::current_dir().map(|d| d.display().to_string()).unwrap_or_default(),
            DATASET_INFO
        ),
    }
}

fn is_data_file(p: &Path) -> bool {
    p.is_file() && matches!(ext(p).as_deref(), Some("json" | "jsonl"))
}

fn ext(p: &Path) -> Option<String> {
    p.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase)
}

/// A dataset given as a path: the format is read from its first row (messages → sharegpt, else alpaca).
fn direct_path(name: &str, path: &Path) -> Result<DatasetAttr> {
    let files = data_files(path, name)?;
    let first = super::read::read_rows(&files[0])?.into_iter().next().map(|r| r.value);
    let mut columns = Columns::default();
    let formatting = match &first {
        Some(Value::Object(o)) => {
            if o.get("images").is_some() {
                columns.images = Some("images".into());
            }
            if o.get("system").is_some() {
                columns.system = Some("system".into());
            }
            if let Some(key) =
                ["messages", "conversations"].into_iter().find(|k| o.get(*k).is_some_and(Value::is_array))
            {
                columns.messages = Some(key.into());
                Formatting::Sharegpt
            } else {
                if o.get("history").is_some() {
                    columns.history = Some("history".into());
                }
                Formatting::Alpaca
            }
        }
        _ => Formatting::Alpaca,
    };
    Ok(DatasetAttr {
        name: name.to_string(),
        files,
        formatting,
        num_samples: None,
        columns,
        tags: Tags::default(),
        tags_given: false,
        origin: format!("file path, read as {}", formatting.name()),
    })
}

/// The data files of a `file_name`: the file itself, or every file in the folder (sorted; one type).
fn data_files(path: &Path, name: &str) -> Result<Vec<PathBuf>> {
    let files = if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("{}: cannot list", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && !p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.')))
            .collect();
        files.sort();
        if files.is_empty() {
            bail!("dataset `{name}`: folder {} has no data files", path.display());
        }
        files
    } else if path.is_file() {
        vec![path.to_path_buf()]
    } else {
        bail!("dataset `{name}`: {} not found", path.display());
    };
    let first = ext(&files[0]);
    for f in &files {
        match ext(f).as_deref() {
            Some("json" | "jsonl") => {}
            Some(e @ ("csv" | "parquet" | "arrow" | "txt")) => bail!(
                "dataset `{name}`: {} is {e}; ferrotune reads json and jsonl (convert it, e.g. with pandas \
                 `to_json(orient=\"records\", lines=True)`)",
                f.display()
            ),
            _ => bail!("dataset `{name}`: {}: unknown file type; expected .json or .jsonl", f.display()),
        }
        if ext(f) != first && path.is_dir() {
            bail!("dataset `{name}`: the files of {} must share one type (json or jsonl)", path.display());
        }
    }
    Ok(files)
}

const ENTRY_KEYS: [&str; 13] = [
    "hf_hub_url",
    "ms_hub_url",
    "om_hub_url",
    "script_url",
    "cloud_file_name",
    "file_name",
    "formatting",
    "ranking",
    "subset",
    "split",
    "folder",
    "num_samples",
    "columns",
];
const COLUMN_KEYS: [&str; 13] = [
    "prompt", "query", "response", "history", "messages", "system", "tools", "images", "videos", "audios", "chosen",
    "rejected", "kto_tag",
];
const TAG_KEYS: [&str; 7] =
    ["role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag"];

fn parse_entry(name: &str, entry: &Value, info_path: &Path, dataset_dir: &Path) -> Result<DatasetAttr> {
    let at = format!("{} entry `{name}`", info_path.display());
    let Value::Object(e) = entry else { bail!("{at}: expected an object") };
    for k in e.keys() {
        // `tags` and `file_sha1` (older releases) are also valid.
        if !ENTRY_KEYS.contains(&k.as_str()) && k != "tags" && k != "file_sha1" {
            let hint = suggest::hint(k, ENTRY_KEYS.iter().copied().chain(["tags"]));
            bail!("{at}: unknown field `{k}`{}", if hint.is_empty() { String::new() } else { format!("; {hint}") });
        }
    }
    let str_field = |k: &str| -> Result<Option<String>> {
        match e.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => bail!("{at}: `{k}` must be a string, got {other}"),
        }
    };
    for hub in ["hf_hub_url", "ms_hub_url", "om_hub_url"] {
        if let Some(url) = str_field(hub)? {
            bail!(
                "{at}: the data is on a hub (`{hub}: {url}`), which ferrotune cannot reach: it reads local files\n  \
                 hint: download it (e.g. `huggingface-cli download --repo-type dataset {url} --local-dir {}/{name}`) \
                 and set `\"file_name\": \"{name}\"` in place of `{hub}`",
                dataset_dir.display()
            );
        }
    }
    if let Some(s) = str_field("script_url")? {
        bail!("{at}: loading scripts (`script_url: {s}`) are not supported; convert the data to json or jsonl");
    }
    if let Some(s) = str_field("cloud_file_name")? {
        bail!("{at}: cloud storage (`cloud_file_name: {s}`) is not reachable; download the file and use `file_name`");
    }
    let file_name = str_field("file_name")?.with_context(|| format!("{at}: no `file_name`"))?;
    let formatting = match str_field("formatting")?.as_deref() {
        None | Some("alpaca") => Formatting::Alpaca,
        Some("sharegpt") => Formatting::Sharegpt,
        Some("openai") => Formatting::Openai,
        Some(other) => bail!("{at}: unknown formatting `{other}`; use alpaca, sharegpt or openai"),
    };
    if e.get("ranking").and_then(Value::as_bool) == Some(true) {
        bail!("{at}: preference data (`ranking: true`) needs stage rm/dpo, which ferrotune does not implement");
    }
    if let Some(split) = str_field("split")? {
        if split != "train" {
            bail!("{at}: `split: {split}`: a local file has only the train split; remove `split`");
        }
    }
    let num_samples = match e.get("num_samples") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64().filter(|n| *n > 0).with_context(|| format!("{at}: `num_samples` must be a positive count"))?
                as usize,
        ),
    };
    let mut columns = Columns::default();
    if let Some(c) = e.get("columns") {
        let Value::Object(c) = c else { bail!("{at}: `columns` must be an object") };
        check_fields(&at, "columns", c, &COLUMN_KEYS)?;
        for k in ["chosen", "rejected", "kto_tag"] {
            if c.get(k).is_some_and(|v| !v.is_null()) {
                bail!("{at}: the `{k}` column is for preference/KTO stages, which ferrotune does not implement");
            }
        }
        let col = |k: &str| c.get(k).and_then(Value::as_str).map(String::from);
        // As in LLaMA-Factory: a `columns` block sets every column, unlisted ones to none.
        columns = Columns {
            prompt: col("prompt"),
            query: col("query"),
            response: col("response"),
            history: col("history"),
            messages: col("messages"),
            system: col("system"),
            tools: col("tools"),
            images: col("images"),
            videos: col("videos"),
            audios: col("audios"),
        };
    }
    let (tags, tags_given) = match e.get("tags") {
        None => (Tags::default(), false),
        Some(Value::Object(t)) => {
            check_fields(&at, "tags", t, &TAG_KEYS)?;
            let tag = |k: &str| t.get(k).and_then(Value::as_str).map(String::from);
            let tags = Tags {
                role: tag("role_tag"),
                content: tag("content_tag"),
                user: tag("user_tag"),
                assistant: tag("assistant_tag"),
                observation: tag("observation_tag"),
                function: tag("function_tag"),
                system: tag("system_tag"),
            };
            (tags, true)
        }
        Some(_) => bail!("{at}: `tags` must be an object"),
    };
    let path = dataset_dir.join(&file_name);
    let files = data_files(&path, name).with_context(|| format!("{at}: file_name {file_name:?}"))?;
    Ok(DatasetAttr {
        name: name.to_string(),
        files,
        formatting,
        num_samples,
        columns,
        tags,
        tags_given,
        origin: format!("{}, {}", info_path.display(), formatting.name()),
    })
}

fn check_fields(at: &str, block: &str, m: &Map<String, Value>, known: &[&'static str]) -> Result<()> {
    for k in m.keys() {
        if !known.contains(&k.as_str()) {
            let hint = suggest::hint(k, known.iter().copied());
            bail!(
                "{at}: unknown `{block}` field `{k}`{}",
                if hint.is_empty() { format!("; known: {}", known.join(", ")) } else { format!("; {hint}") }
            );
        }
    }
    Ok(())
}
