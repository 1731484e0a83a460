//! Captioned scenes of simple shapes, for pretraining the small base model to see and to speak before it ever
//! meets a robot. Deliberately not the robot task, but the same visual words: the colour vocabulary is
//! [`super::COLOURS`], and the shape words (圆形, 方形, 三角形 / round, square, triangular) are the ones robot
//! heads are described with.
//!
//! ```text
//! dir/scenes.json        [{"messages":[{"role":"user","content":"<image>请描述这张图片"},
//!                          {"role":"assistant","content":"图中有两个图形：左上角是一个红色的圆形，…"}],
//!                          "images":["scenes/scene_0001.png"],
//!                          "attributes":{"shapes":[{"shape":"circle","colour":"red","position":"top_left"},…]}}]
//! dir/scenes_eval.json   held-out split, same shape
//! dir/scenes/*.png       128×128 pictures with 1–3 shapes on a 3×3 grid of positions
//! dir/dataset_info.json  registers scenes and scenes_eval
//! ```
//!
//! Each row asks one question, in Chinese or English: describe the picture, how many shapes, what colour a shape
//! is, or where a shape is.

use std::path::Path;

use anyhow::{Context, Result};
use image::RgbImage;
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use super::draw::{regular_polygon, shade, star, Canvas, Rgb8};
use super::robots::Background;
use super::{Colour, Lang, Summary, COLOURS};

pub const TRAIN_NAME: &str = "scenes";
pub const EVAL_NAME: &str = "scenes_eval";
pub const SIZE: u32 = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Shape {
    Circle,
    Square,
    Triangle,
    Star,
    Diamond,
    Hexagon,
}

impl Shape {
    pub const ALL: [Shape; 6] =
        [Shape::Circle, Shape::Square, Shape::Triangle, Shape::Star, Shape::Diamond, Shape::Hexagon];
    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Star => "star",
            Shape::Diamond => "diamond",
            Shape::Hexagon => "hexagon",
        }
    }
    pub fn zh(self) -> &'static str {
        match self {
            Shape::Circle => "圆形",
            Shape::Square => "正方形",
            Shape::Triangle => "三角形",
            Shape::Star => "五角星",
            Shape::Diamond => "菱形",
            Shape::Hexagon => "六边形",
        }
    }
    pub fn en(self) -> &'static str {
        self.name()
    }
}

/// Cells of the 3×3 position grid, row by row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Position {
    TopLeft,
    Top,
    TopRight,
    Left,
    Centre,
    Right,
    BottomLeft,
    Bottom,
    BottomRight,
}

impl Position {
    pub const ALL: [Position; 9] = [
        Position::TopLeft,
        Position::Top,
        Position::TopRight,
        Position::Left,
        Position::Centre,
        Position::Right,
        Position::BottomLeft,
        Position::Bottom,
        Position::BottomRight,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Position::TopLeft => "top_left",
            Position::Top => "top",
            Position::TopRight => "top_right",
            Position::Left => "left",
            Position::Centre => "centre",
            Position::Right => "right",
            Position::BottomLeft => "bottom_left",
            Position::Bottom => "bottom",
            Position::BottomRight => "bottom_right",
        }
    }
    pub fn zh(self) -> &'static str {
        match self {
            Position::TopLeft => "左上角",
            Position::Top => "上方",
            Position::TopRight => "右上角",
            Position::Left => "左侧",
            Position::Centre => "中间",
            Position::Right => "右侧",
            Position::BottomLeft => "左下角",
            Position::Bottom => "下方",
            Position::BottomRight => "右下角",
        }
    }
    /// The place with its preposition ("in the top-left corner").
    pub fn en(self) -> &'static str {
        match self {
            Position::TopLeft => "in the top-left corner",
            Position::Top => "at the top",
            Position::TopRight => "in the top-right corner",
            Position::Left => "on the left",
            Position::Centre => "in the centre",
            Position::Right => "on the right",
            Position::BottomLeft => "in the bottom-left corner",
            Position::Bottom => "at the bottom",
            Position::BottomRight => "in the bottom-right corner",
        }
    }
    fn cell(self) -> (f32, f32) {
        let i = Position::ALL.iter().position(|&p| p == self).unwrap_or(4);
        ((i % 3) as f32, (i / 3) as f32)
    }
}

/// One shape of a scene.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Item {
    pub shape: Shape,
    pub colour: Colour,
    pub position: Position,
    /// Radius in pixels (about half the shape's width).
    pub radius: f32,
    /// Offset from the cell centre.
    pub dx: f32,
    pub dy: f32,
    /// Rotation in radians (shapes with corners).
    pub rotation: f32,
}

/// Backgrounds: flat mid tones, none of them a palette colour.
pub const BACKGROUNDS: [(&str, Rgb8); 5] = [
    ("grey", [168, 168, 164]),
    ("beige", [214, 200, 172]),
    ("sky", [176, 200, 222]),
    ("sage", [172, 190, 160]),
    ("slate", [104, 112, 124]),
];

/// A scene: 1–3 shapes of different kinds in different cells.
#[derive(Debug, Clone, PartialEq)]
pub struct SceneSpec {
    pub items: Vec<Item>,
    /// Index into [`BACKGROUNDS`].
    pub background: usize,
    /// A furnished setting drawn instead of the flat background (see [`SceneOptions::settings`]).
    pub setting: Option<Background>,
}

impl SceneSpec {
    /// The row's `attributes`: the shapes, left to right and top to bottom.
    pub fn attributes(&self) -> Value {
        let shapes: Vec<Value> = self
            .items
            .iter()
            .map(|it| json!({"shape": it.shape.name(), "colour": it.colour.name, "position": it.position.name()}))
            .collect();
        json!({ "shapes": shapes })
    }
}

/// Kinds of question a row asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Question {
    Describe,
    Count,
    Colour,
    Where,
}

/// Options of [`generate`].
#[derive(Debug, Clone)]
pub struct SceneOptions {
    pub n_train: usize,
    pub n_eval: usize,
    pub seed: u64,
    /// Each row's language is drawn from these (both by default).
    pub langs: Vec<Lang>,
    /// Shapes per picture are drawn from 1..=max_shapes.
    pub max_shapes: usize,
    /// Shape radius in pixels, drawn from this range.
    pub radius: (f32, f32),
    /// Short, mostly visual answers ("red.", "a blue star.", "3.") instead of full captions: a model trained
    /// from scratch first has to learn to look, and long captions let it score well on language alone.
    pub short: bool,
    /// Name of the dataset: files `<name>.json` / `<name>_eval.json`, images under `<name>/`, dataset names
    /// `<name>` and `<name>_eval` (so several variants can share one dataset_dir).
    pub name: String,
    /// Draw half the pictures on furnished settings (factory, lawn, lab, warehouse, office) rather than a flat
    /// tone, so the model learns to tell shapes from a busy background.
    pub settings: bool,
}

impl Default for SceneOptions {
    fn default() -> Self {
        SceneOptions {
            n_train: 2000,
            n_eval: 100,
            seed: 7,
            langs: vec![Lang::Zh, Lang::En],
            max_shapes: 3,
            radius: (13.0, 18.0),
            short: false,
            name: TRAIN_NAME.to_string(),
            settings: false,
        }
    }
}

/// A random scene.
pub fn sample_scene(rng: &mut impl Rng) -> SceneSpec {
    sample_scene_with(rng, 3, (13.0, 18.0))
}

/// A random scene of 1..=`max_shapes` shapes with radii in `radius`.
pub fn sample_scene_with(rng: &mut impl Rng, max_shapes: usize, radius: (f32, f32)) -> SceneSpec {
    let n = rng.random_range(1..=max_shapes.clamp(1, Position::ALL.len()));
    let mut shapes = Shape::ALL.to_vec();
    shapes.shuffle(rng);
    let mut cells = Position::ALL.to_vec();
    cells.shuffle(rng);
    let mut items: Vec<Item> = (0..n)
        .map(|i| Item {
            shape: shapes[i],
            colour: *COLOURS.choose(rng).unwrap_or(&COLOURS[0]),
            position: cells[i],
            radius: rng.random_range(radius.0..radius.1.max(radius.0 + 1.0)).round(),
            dx: rng.random_range(-3.0f32..=3.0).round(),
            dy: rng.random_range(-3.0f32..=3.0).round(),
            rotation: rng.random_range(-0.25f32..0.25),
        })
        .collect();
    // Reading order, so that descriptions list shapes as a reader scans the picture.
    items.sort_by_key(|it| Position::ALL.iter().position(|&p| p == it.position));
    SceneSpec { items, background: rng.random_range(0..BACKGROUNDS.len()), setting: None }
}

/// Draws `spec`; `rng` varies the background shading.
pub fn draw_scene(spec: &SceneSpec, rng: &mut impl Rng) -> RgbImage {
    let bg = BACKGROUNDS[spec.background.min(BACKGROUNDS.len() - 1)].1;
    let mut cv = Canvas::new(SIZE, SIZE, 2, bg);
    if let Some(setting) = spec.setting {
        super::robots::draw_background(&mut cv, setting, rng);
    } else {
        let f = rng.random_range(0.94f32..1.06);
        cv.vertical_gradient(0.0, SIZE as f32, shade(bg, f), shade(bg, 2.0 - f));
    }
    let cell = SIZE as f32 / 3.0;
    let outline: Rgb8 = [24, 24, 28];
    for it in &spec.items {
        let (col, row) = it.position.cell();
        let cx = (col + 0.5) * cell + it.dx;
        let cy = (row + 0.5) * cell + it.dy;
        let r = it.radius;
        let c = it.colour.rgb;
        match it.shape {
            Shape::Circle => {
                cv.circle(cx, cy, r + 1.5, outline);
                cv.circle(cx, cy, r, c);
            }
            Shape::Square => {
                let pts = regular_polygon(cx, cy, r * 1.3, 4, std::f32::consts::FRAC_PI_4 + it.rotation);
                cv.polygon(&pts, c);
                cv.polyline_closed(&pts, 3.0, outline);
            }
            Shape::Triangle => {
                let pts = regular_polygon(cx, cy + r * 0.2, r * 1.3, 3, it.rotation * 0.5);
                cv.polygon(&pts, c);
                cv.polyline_closed(&pts, 3.0, outline);
            }
            Shape::Star => {
                let pts = star(cx, cy, r * 1.3, 0.45);
                cv.polygon(&pts, c);
                cv.polyline_closed(&pts, 2.5, outline);
            }
            Shape::Diamond => {
                let pts = vec![(cx, cy - r * 1.25), (cx + r * 0.85, cy), (cx, cy + r * 1.25), (cx - r * 0.85, cy)];
                cv.polygon(&pts, c);
                cv.polyline_closed(&pts, 3.0, outline);
            }
            Shape::Hexagon => {
                let pts = regular_polygon(cx, cy, r * 1.15, 6, std::f32::consts::FRAC_PI_6 + it.rotation);
                cv.polygon(&pts, c);
                cv.polyline_closed(&pts, 3.0, outline);
            }
        }
    }
    cv.finish()
}

fn count_zh(n: usize) -> String {
    const WORDS: [&str; 10] = ["零", "一", "两", "三", "四", "五", "六", "七", "八", "九"];
    WORDS.get(n).map_or_else(|| n.to_string(), |w| w.to_string())
}

fn count_en(n: usize) -> String {
    const WORDS: [&str; 10] = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"];
    WORDS.get(n).map_or_else(|| n.to_string(), |w| w.to_string())
}

fn a_en(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

/// The full caption of a scene.
pub fn caption(spec: &SceneSpec, lang: Lang) -> String {
    let n = spec.items.len();
    if n == 0 {
        return match lang {
            Lang::Zh => "图中没有图形。".to_string(),
            Lang::En => "There are no shapes in the picture.".to_string(),
        };
    }
    match lang {
        Lang::Zh => {
            let parts: Vec<String> = spec
                .items
                .iter()
                .map(|it| format!("{}是一个{}的{}", it.position.zh(), it.colour.zh, it.shape.zh()))
                .collect();
            if n == 1 {
                format!("图中有一个图形：{}。", parts[0])
            } else {
                format!("图中有{}个图形：{}。", count_zh(n), parts.join("，"))
            }
        }
        Lang::En => {
            let parts: Vec<String> = spec
                .items
                .iter()
                .map(|it| format!("{} {} {} {}", a_en(it.colour.en), it.colour.en, it.shape.en(), it.position.en()))
                .collect();
            let list = match parts.split_last() {
                Some((last, [])) => last.clone(),
                Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
                None => String::new(),
            };
            if n == 1 {
                format!("There is one shape in the picture: {list}.")
            } else {
                format!("There are {} shapes in the picture: {list}.", count_en(n))
            }
        }
    }
}

/// A question about `spec` and its answer, with a phrasing drawn from `rng`.
/// A short question whose answer is mostly what the picture shows: the colour or shape of the (or a named)
/// shape, a two-word description, or how many shapes there are.
pub fn short_question(spec: &SceneSpec, lang: Lang, rng: &mut impl Rng) -> (String, String) {
    let n = spec.items.len();
    let Some(it) = spec.items.choose(rng).copied() else {
        return match lang {
            Lang::Zh => ("图中有几个图形？".into(), "没有。".into()),
            Lang::En => ("How many shapes are there?".into(), "None.".into()),
        };
    };
    let kind = if n == 1 { rng.random_range(0..3) } else { 3 + rng.random_range(0..2) };
    match (kind, lang) {
        (0, Lang::Zh) => ("这个图形是什么颜色？".into(), format!("{}。", it.colour.zh)),
        (0, Lang::En) => ("What colour is the shape?".into(), format!("{}.", it.colour.en)),
        (1, Lang::Zh) => ("这是什么图形？".into(), format!("{}。", it.shape.zh())),
        (1, Lang::En) => ("What shape is it?".into(), format!("{} {}.", a_en(it.shape.en()), it.shape.en())),
        (2, Lang::Zh) => ("简单描述一下这个图形。".into(), format!("一个{}的{}。", it.colour.zh, it.shape.zh())),
        (2, Lang::En) => (
            "Describe the shape briefly.".into(),
            format!("{} {} {}.", a_en(it.colour.en), it.colour.en, it.shape.en()),
        ),
        (3, Lang::Zh) => ("图中有几个图形？".into(), format!("{}个。", count_zh(n))),
        (3, Lang::En) => ("How many shapes are there?".into(), format!("{n}.")),
        (_, Lang::Zh) => (format!("{}是什么颜色的？", it.shape.zh()), format!("{}。", it.colour.zh)),
        (_, Lang::En) => (format!("What colour is the {}?", it.shape.en()), format!("{}.", it.colour.en)),
    }
}

pub fn question(spec: &SceneSpec, kind: Question, lang: Lang, rng: &mut impl Rng) -> (String, String) {
    let n = spec.items.len();
    let Some(it) = spec.items.choose(rng).copied() else {
        // Nothing to ask about colour or place: describe the (empty) picture.
        let q = if lang == Lang::Zh { "请描述这张图片" } else { "Describe this picture." };
        return (q.to_string(), caption(spec, lang));
    };
    let pick =
        |rng: &mut dyn rand::RngCore, opts: &[&str]| -> String { opts[rng.random_range(0..opts.len())].to_string() };
    match (kind, lang) {
        (Question::Describe, Lang::Zh) => {
            (pick(rng, &["请描述这张图片", "图片里有什么？", "描述一下图中的图形"]), caption(spec, lang))
        }
        (Question::Describe, Lang::En) => (
            pick(rng, &["Describe this picture.", "What is in the picture?", "Describe the shapes in the image."]),
            caption(spec, lang),
        ),
        (Question::Count, Lang::Zh) => {
            (pick(rng, &["图中有几个图形？", "这张图片里一共有多少个图形？"]), format!("图中有{}个图形。", count_zh(n)))
        }
        (Question::Count, Lang::En) => (
            pick(rng, &["How many shapes are in the picture?", "Count the shapes in the image."]),
            format!(
                "There {} {} {} in the picture.",
                if n == 1 { "is" } else { "are" },
                count_en(n),
                if n == 1 { "shape" } else { "shapes" }
            ),
        ),
        (Question::Colour, Lang::Zh) => (
            format!("图中的{}是什么颜色的？", it.shape.zh()),
            format!("{}的{}是{}的。", it.position.zh(), it.shape.zh(), it.colour.zh),
        ),
        (Question::Colour, Lang::En) => (
            format!("What colour is the {}?", it.shape.en()),
            format!("The {} {} is {}.", it.shape.en(), it.position.en(), it.colour.en),
        ),
        (Question::Where, Lang::Zh) => (
            format!("{}的{}在哪里？", it.colour.zh, it.shape.zh()),
            format!("{}的{}在图片的{}。", it.colour.zh, it.shape.zh(), it.position.zh()),
        ),
        (Question::Where, Lang::En) => (
            format!("Where is the {} {}?", it.colour.en, it.shape.en()),
            format!("The {} {} is {}.", it.colour.en, it.shape.en(), it.position.en()),
        ),
    }
}

/// Writes the train and held-out splits, their images and `dataset_info.json` entries under `dir`.
pub fn generate(dir: &Path, opts: &SceneOptions) -> Result<Summary> {
    let name = opts.name.as_str();
    let img_dir = dir.join(name);
    std::fs::create_dir_all(&img_dir).with_context(|| format!("creating {}", img_dir.display()))?;
    let langs = if opts.langs.is_empty() { vec![Lang::Zh, Lang::En] } else { opts.langs.clone() };
    let mut master = StdRng::seed_from_u64(opts.seed);
    let mut bytes = 0u64;
    let (train_file, eval_file) = (format!("{name}.json"), format!("{name}_eval.json"));
    for (file, stem, n) in
        [(train_file.as_str(), "scene", opts.n_train), (eval_file.as_str(), "scene_eval", opts.n_eval)]
    {
        let mut rng = StdRng::seed_from_u64(master.random());
        let mut rows = Vec::with_capacity(n);
        // Half the rows describe the whole picture (the skill the robot task needs); the rest ask the others.
        let kinds = super::balanced(
            &[
                Question::Describe,
                Question::Describe,
                Question::Describe,
                Question::Count,
                Question::Colour,
                Question::Where,
            ],
            n,
            &mut rng,
        );
        for (i, kind) in kinds.into_iter().enumerate() {
            let mut spec = sample_scene_with(&mut rng, opts.max_shapes, opts.radius);
            if opts.settings && rng.random_bool(0.5) {
                spec.setting = Background::ALL.choose(&mut rng).copied();
            }
            let mut draw_rng = StdRng::seed_from_u64(rng.random());
            let img = draw_scene(&spec, &mut draw_rng);
            let rel = format!("{name}/{stem}_{:04}.png", i + 1);
            bytes += super::write_png(&dir.join(&rel), &img)?;
            let lang = *langs.choose(&mut rng).unwrap_or(&Lang::Zh);
            let (q, a) =
                if opts.short { short_question(&spec, lang, &mut rng) } else { question(&spec, kind, lang, &mut rng) };
            rows.push(super::sharegpt_row(&format!("<image>{q}"), &a, &rel, spec.attributes()));
        }
        bytes += super::write_json(&dir.join(file), &Value::Array(rows))?;
    }
    let eval_name = format!("{name}_eval");
    bytes += super::register_datasets(
        dir,
        &[(name, super::dataset_info_entry(&train_file)), (&eval_name, super::dataset_info_entry(&eval_file))],
    )?;
    Ok(Summary {
        datasets: vec![name.to_string(), eval_name],
        n_train: opts.n_train,
        n_eval: opts.n_eval,
        images: opts.n_train + opts.n_eval,
        bytes,
    })
}
