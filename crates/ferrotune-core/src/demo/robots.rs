//! The synthetic robot dataset: the fine-tuning task of the demo, in the reference run's shape.
//!
//! ```text
//! dir/mllm_robot.json        [{"messages":[{"role":"user","content":"<image>请识别并描述图片中的机器人及其特征"},
//!                              {"role":"assistant","content":"这是一个白色的服务机器人，它有圆形的头部，…"}],
//!                              "images":["robots/robot_0001.png"],
//!                              "attributes":{"colour":"white","head":"round","arms":2,…}}, …]
//! dir/mllm_robot_eval.json   the held-out split, same shape
//! dir/robots/*.png           128×128 pictures
//! dir/dataset_info.json      registers mllm_robot and mllm_robot_eval
//! ```
//!
//! The robot fills most of the frame so that a vision tower with 16×16-pixel patches (an 8×8 grid) can resolve
//! every labelled attribute: body colour (torso and head), head shape (two patches tall), arms (grey limbs
//! reaching the outer patch columns), locomotion (the bottom two patch rows; four legs splay into the outer
//! columns, two stay in the middle ones), chest screen and antenna.
//! See [`crate::eval::attributes`] for the `attributes` field.

use std::path::Path;

use anyhow::{Context, Result};
use image::RgbImage;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use super::draw::{mix, shade, Canvas, Rgb8};
use super::{balanced, Colour, Lang, Summary, COLOURS};
use crate::eval::attributes::Attributes;

/// The user turn of every row, as in the reference run (with the image placeholder LLaMA-Factory requires).
pub const PROMPT_ZH: &str = "<image>请识别并描述图片中的机器人及其特征";
/// The English user turn.
pub const PROMPT_EN: &str = "<image>Identify and describe the robot in the picture and its features.";

/// Dataset names in `dataset_info.json`.
pub const TRAIN_NAME: &str = "mllm_robot";
pub const EVAL_NAME: &str = "mllm_robot_eval";

/// Image side in pixels.
pub const SIZE: u32 = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Head {
    Round,
    Square,
    Triangular,
    Dome,
}

impl Head {
    pub const ALL: [Head; 4] = [Head::Round, Head::Square, Head::Triangular, Head::Dome];
    /// The label written in `attributes.head`.
    pub fn name(self) -> &'static str {
        match self {
            Head::Round => "round",
            Head::Square => "square",
            Head::Triangular => "triangular",
            Head::Dome => "dome",
        }
    }
    pub fn zh(self) -> &'static str {
        match self {
            Head::Round => "圆形",
            Head::Square => "方形",
            Head::Triangular => "三角形",
            Head::Dome => "半球形",
        }
    }
    pub fn en(self) -> &'static str {
        match self {
            Head::Round => "round",
            Head::Square => "square",
            Head::Triangular => "triangular",
            Head::Dome => "dome-shaped",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Locomotion {
    Wheels,
    Tracks,
    TwoLegs,
    FourLegs,
}

impl Locomotion {
    pub const ALL: [Locomotion; 4] =
        [Locomotion::Wheels, Locomotion::Tracks, Locomotion::TwoLegs, Locomotion::FourLegs];
    /// The label written in `attributes.locomotion`.
    pub fn name(self) -> &'static str {
        match self {
            Locomotion::Wheels => "wheels",
            Locomotion::Tracks => "tracks",
            Locomotion::TwoLegs => "two_legs",
            Locomotion::FourLegs => "four_legs",
        }
    }
    pub fn zh(self) -> &'static str {
        match self {
            Locomotion::Wheels => "靠轮子移动",
            Locomotion::Tracks => "靠履带移动",
            Locomotion::TwoLegs => "用两条腿行走",
            Locomotion::FourLegs => "用四条腿行走",
        }
    }
    pub fn en(self) -> &'static str {
        match self {
            Locomotion::Wheels => "moves on wheels",
            Locomotion::Tracks => "moves on tracks",
            Locomotion::TwoLegs => "walks on two legs",
            Locomotion::FourLegs => "walks on four legs",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Background {
    Factory,
    Lawn,
    Lab,
    Warehouse,
    Office,
}

impl Background {
    pub const ALL: [Background; 5] =
        [Background::Factory, Background::Lawn, Background::Lab, Background::Warehouse, Background::Office];
    /// The label written in `attributes.background`.
    pub fn name(self) -> &'static str {
        match self {
            Background::Factory => "factory",
            Background::Lawn => "lawn",
            Background::Lab => "lab",
            Background::Warehouse => "warehouse",
            Background::Office => "office",
        }
    }
    pub fn zh(self) -> &'static str {
        match self {
            Background::Factory => "工厂车间",
            Background::Lawn => "户外草坪",
            Background::Lab => "实验室",
            Background::Warehouse => "仓库",
            Background::Office => "办公室",
        }
    }
    /// The place with its preposition ("in a factory").
    pub fn en(self) -> &'static str {
        match self {
            Background::Factory => "in a factory",
            Background::Lawn => "on a lawn outdoors",
            Background::Lab => "in a laboratory",
            Background::Warehouse => "in a warehouse",
            Background::Office => "in an office",
        }
    }
}

/// Arm counts drawn.
pub const ARM_COUNTS: [u32; 4] = [0, 1, 2, 4];

/// Everything that decides a robot picture. The labelled attributes come first; `dx`, `dy` and `arm_right`
/// only vary the drawing.
#[derive(Debug, Clone, PartialEq)]
pub struct RobotSpec {
    pub colour: Colour,
    pub head: Head,
    /// 0, 1, 2 or 4 (any other count is drawn as 4).
    pub arms: u32,
    /// Grippers at the ends of the arms (always false without arms).
    pub grippers: bool,
    pub locomotion: Locomotion,
    pub screen: bool,
    pub antenna: bool,
    pub background: Background,
    /// Offset of the robot from the centre of the frame, in pixels.
    pub dx: f32,
    pub dy: f32,
    /// Side of a single arm.
    pub arm_right: bool,
}

impl RobotSpec {
    /// The labels written in the row's `attributes` field.
    pub fn attributes(&self) -> Attributes {
        Attributes {
            colour: Some(self.colour.name.to_string()),
            head: Some(self.head.name().to_string()),
            arms: Some(self.arms),
            grippers: Some(self.grippers),
            locomotion: Some(self.locomotion.name().to_string()),
            screen: Some(self.screen),
            antenna: Some(self.antenna),
            background: Some(self.background.name().to_string()),
        }
    }

    /// The torso rectangle (x0, y0, x1, y1) in pixels; its lower third is plain body colour.
    pub fn torso(&self) -> (f32, f32, f32, f32) {
        let cx = 64.0 + self.dx;
        (cx - 24.0, 50.0 + self.dy, cx + 24.0, 92.0 + self.dy)
    }
}

/// Options of [`generate`].
#[derive(Debug, Clone)]
pub struct RobotOptions {
    pub n_train: usize,
    pub n_eval: usize,
    pub seed: u64,
    pub lang: Lang,
}

impl Default for RobotOptions {
    fn default() -> Self {
        RobotOptions { n_train: 500, n_eval: 50, seed: 42, lang: Lang::Zh }
    }
}

/// `n` robot specs with every attribute balanced over its values.
pub fn sample_specs(n: usize, rng: &mut StdRng) -> Vec<RobotSpec> {
    let colours = balanced(&COLOURS, n, rng);
    let heads = balanced(&Head::ALL, n, rng);
    let arms = balanced(&ARM_COUNTS, n, rng);
    let locos = balanced(&Locomotion::ALL, n, rng);
    let bgs = balanced(&Background::ALL, n, rng);
    let screens = balanced(&[true, false], n, rng);
    let antennas = balanced(&[true, false], n, rng);
    let grippers = balanced(&[true, false], n, rng);
    (0..n)
        .map(|i| RobotSpec {
            colour: colours[i],
            head: heads[i],
            arms: arms[i],
            grippers: arms[i] > 0 && grippers[i],
            locomotion: locos[i],
            screen: screens[i],
            antenna: antennas[i],
            background: bgs[i],
            dx: rng.random_range(-5.0f32..=5.0).round(),
            dy: rng.random_range(-3.0f32..=3.0).round(),
            arm_right: rng.random_bool(0.5),
        })
        .collect()
}

/// Writes the train and held-out splits, their images and `dataset_info.json` under `dir` (created if needed;
/// entries already in `dataset_info.json` are kept).
pub fn generate(dir: &Path, opts: &RobotOptions) -> Result<Summary> {
    let img_dir = dir.join("robots");
    std::fs::create_dir_all(&img_dir).with_context(|| format!("creating {}", img_dir.display()))?;
    let mut master = StdRng::seed_from_u64(opts.seed);
    let mut bytes = 0u64;
    let splits = [
        (TRAIN_NAME, "mllm_robot.json", "robot", opts.n_train),
        (EVAL_NAME, "mllm_robot_eval.json", "robot_eval", opts.n_eval),
    ];
    for (_, file, stem, n) in splits {
        // Each split has its own stream, so the held-out split does not change when n_train does.
        let mut rng = StdRng::seed_from_u64(master.random());
        let specs = sample_specs(n, &mut rng);
        let mut rows = Vec::with_capacity(n);
        for (i, spec) in specs.iter().enumerate() {
            let mut draw_rng = StdRng::seed_from_u64(rng.random());
            let img = draw_robot(spec, &mut draw_rng);
            let rel = format!("robots/{stem}_{:04}.png", i + 1);
            bytes += super::write_png(&dir.join(&rel), &img)?;
            let answer = describe(spec, opts.lang, &mut rng);
            let prompt = match opts.lang {
                Lang::Zh => PROMPT_ZH,
                Lang::En => PROMPT_EN,
            };
            let attributes = serde_json::to_value(spec.attributes())?;
            rows.push(super::sharegpt_row(prompt, &answer, &rel, attributes));
        }
        bytes += super::write_json(&dir.join(file), &Value::Array(rows))?;
    }
    bytes += super::register_datasets(
        dir,
        &[
            (TRAIN_NAME, super::dataset_info_entry("mllm_robot.json")),
            (EVAL_NAME, super::dataset_info_entry("mllm_robot_eval.json")),
        ],
    )?;
    Ok(Summary {
        datasets: vec![TRAIN_NAME.into(), EVAL_NAME.into()],
        n_train: opts.n_train,
        n_eval: opts.n_eval,
        images: opts.n_train + opts.n_eval,
        bytes,
    })
}

/// The description of `spec` in `lang`, from one of a few sentence templates picked with `rng`. Every labelled
/// attribute is stated, absent screen and antenna included, so that a description can be checked against the
/// labels attribute by attribute.
pub fn describe(spec: &RobotSpec, lang: Lang, rng: &mut impl Rng) -> String {
    let t = rng.random_range(0..3);
    match lang {
        Lang::Zh => {
            let c = spec.colour.zh;
            let h = spec.head.zh();
            let arms = match spec.arms {
                0 => "没有机械臂".to_string(),
                n => format!(
                    "有{}机械臂，末端{}夹爪",
                    match n {
                        1 => "一只",
                        2 => "两只",
                        _ => "四只",
                    },
                    if spec.grippers { "装有" } else { "没有" }
                ),
            };
            let loco = spec.locomotion.zh();
            let screen = if spec.screen { "胸前有一块显示屏" } else { "胸前没有显示屏" };
            // Not "头顶有一根天线 / 头顶没有天线": the tokenizer fuses 顶's last bytes with 有一, so that choice
            // fell on two tokens found nowhere else, which the base (pretrained on these sentences without
            // pictures) learned as near-twins (cosine 0.96 between their embeddings, 0.17 for the screen's
            // choice) and no decoder LoRA told apart (antenna at chance in every run). After 上 the choice is
            // 有一 / 没, the tokens of the other attributes.
            let ant = if spec.antenna { "头顶上有一根天线" } else { "头顶上没有天线" };
            let bg = spec.background.zh();
            match t {
                0 => format!("这是一个{c}的服务机器人，它有{h}的头部，{arms}，{loco}。它{screen}，{ant}。背景是{bg}。"),
                1 => format!(
                    "图片中是一个{c}的机器人。它的头部是{h}的，{arms}，{loco}。{screen}，{ant}。机器人位于{bg}中。"
                ),
                _ => format!("这个机器人的机身是{c}的，头部呈{h}，{arms}，{loco}。{screen}，{ant}，背景是{bg}。"),
            }
        }
        Lang::En => {
            let c = spec.colour.en;
            let a = if c.starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" };
            let h = spec.head.en();
            let arms = match (spec.arms, spec.grippers) {
                (0, _) => "no arms".to_string(),
                (1, g) => format!("one arm {}", if g { "with a gripper" } else { "without a gripper" }),
                (n, g) => format!(
                    "{} arms {}",
                    if n == 2 { "two" } else { "four" },
                    if g { "with grippers" } else { "without grippers" }
                ),
            };
            let loco = spec.locomotion.en();
            let screen = if spec.screen { "a screen on its chest" } else { "no screen on its chest" };
            let ant = if spec.antenna { "an antenna on its head" } else { "no antenna" };
            let bg = spec.background.en();
            match t {
                0 => format!("This is {a} {c} service robot with a {h} head and {arms}. It {loco}. It has {screen} and {ant}. The picture was taken {bg}."),
                1 => format!("The picture shows {a} {c} robot. Its head is {h}, it has {arms}, and it {loco}. There is {screen}, and it has {ant}. The robot is {bg}."),
                _ => {
                    let a = if a == "an" { "An" } else { "A" };
                    format!("{a} {c} robot stands {bg}. It has a {h} head and {arms}, and it {loco}. It has {screen} and {ant}.")
                }
            }
        }
    }
}

const OUTLINE: Rgb8 = [22, 22, 26];
const METAL: Rgb8 = [128, 128, 140];
const DARK_METAL: Rgb8 = [64, 64, 72];
const TYRE: Rgb8 = [44, 44, 48];

/// Floor line (the y where the floor starts) of every background.
const HORIZON: f32 = 100.0;

/// Draws `spec` on its background; `rng` only varies details (body shade, background props).
pub fn draw_robot(spec: &RobotSpec, rng: &mut impl Rng) -> RgbImage {
    let mut cv = Canvas::new(SIZE, SIZE, 2, [0, 0, 0]);
    let floor = draw_background(&mut cv, spec.background, rng);
    // A slight shade of the body colour per picture, far smaller than the distance between palette colours.
    let base = spec.colour.rgb;
    let body: Rgb8 = [0, 1, 2].map(|c| (base[c] as i32 + rng.random_range(-8i32..=8)).clamp(0, 255) as u8);
    let cx = 64.0 + spec.dx;
    let (tx0, ty0, tx1, ty1) = spec.torso();
    // Shadow on the floor.
    cv.ellipse(cx, 124.0, 38.0, 4.0, shade(floor, 0.75));

    draw_locomotion(&mut cv, spec.locomotion, cx, ty1);
    draw_arms(&mut cv, spec, cx, ty0, body);

    // Neck, torso.
    cv.rect(cx - 7.0, ty0 - 6.0, cx + 7.0, ty0 + 2.0, OUTLINE);
    cv.rect(cx - 5.5, ty0 - 6.0, cx + 5.5, ty0 + 2.0, METAL);
    cv.rounded_rect(tx0 - 1.5, ty0 - 1.5, tx1 + 1.5, ty1 + 1.5, 7.5, OUTLINE);
    cv.rounded_rect(tx0, ty0, tx1, ty1, 6.0, body);
    if spec.screen {
        cv.rect(cx - 16.0, ty0 + 5.0, cx + 16.0, ty0 + 24.0, OUTLINE);
        cv.rect(cx - 14.5, ty0 + 6.5, cx + 14.5, ty0 + 22.5, [24, 34, 52]);
        // A trace on the screen, so it reads as a display rather than a dark patch.
        let glow = [150, 232, 240];
        let pts = [(-11.0, 16.0), (-6.0, 10.0), (-1.0, 18.0), (4.0, 11.0), (10.0, 15.0)];
        for w in pts.windows(2) {
            cv.line(cx + w[0].0, ty0 + w[0].1, cx + w[1].0, ty0 + w[1].1, 1.6, glow);
        }
    } else {
        // A plain panel seam, so a screenless chest is not entirely flat.
        cv.line(cx - 12.0, ty0 + 14.0, cx + 12.0, ty0 + 14.0, 1.2, shade(body, 0.7));
    }

    let head_bottom = ty0 - 4.0;
    if spec.antenna {
        // A mast rising from inside the head (drawn first, so the head covers its foot) to a ball in the empty
        // upper right, at the same place whatever the head: above the tallest heads a mast on the crown left
        // the frame (a triangular head's whole antenna, half of a round head's ball), and a thin one fell below
        // what the tower's tokens keep.
        let (bx, by) = (cx + 19.0, head_bottom - 36.0);
        cv.line(cx + 6.0, head_bottom - 20.0, bx, by, 5.0, OUTLINE);
        cv.line(cx + 6.0, head_bottom - 20.0, bx, by, 3.0, METAL);
        cv.circle(bx, by, 5.5, OUTLINE);
        cv.circle(bx, by, 4.2, DARK_METAL);
    }
    draw_head(&mut cv, spec.head, cx, head_bottom, body);
    cv.finish()
}

/// Draws the head resting on y = `bottom`.
fn draw_head(cv: &mut Canvas, head: Head, cx: f32, bottom: f32, body: Rgb8) {
    let (eye_y, eye_dx) = match head {
        Head::Round => {
            let r = 17.0;
            cv.circle(cx, bottom - r, r + 1.5, OUTLINE);
            cv.circle(cx, bottom - r, r, body);
            (bottom - r, 7.5)
        }
        Head::Square => {
            cv.rounded_rect(cx - 19.5, bottom - 31.5, cx + 19.5, bottom + 1.5, 4.0, OUTLINE);
            cv.rounded_rect(cx - 18.0, bottom - 30.0, cx + 18.0, bottom, 3.0, body);
            (bottom - 16.0, 8.5)
        }
        Head::Triangular => {
            let pts = [(cx, bottom - 35.0), (cx + 23.0, bottom), (cx - 23.0, bottom)];
            cv.polygon(&pts, body);
            cv.polyline_closed(&pts, 3.0, OUTLINE);
            (bottom - 10.0, 6.5)
        }
        Head::Dome => {
            cv.half_ellipse(cx, bottom + 1.5, 23.5, 25.5, OUTLINE);
            cv.half_ellipse(cx, bottom, 22.0, 24.0, body);
            (bottom - 9.0, 8.0)
        }
    };
    for s in [-1.0, 1.0] {
        let ex = cx + s * eye_dx;
        cv.circle(ex, eye_y, 4.2, OUTLINE);
        cv.circle(ex, eye_y, 3.0, [236, 244, 255]);
        cv.circle(ex + 0.6, eye_y, 1.5, OUTLINE);
    }
}

/// Arms as grey limbs from the torso's sides, ending in a two-fingered gripper or a plain ball.
fn draw_arms(cv: &mut Canvas, spec: &RobotSpec, cx: f32, ty0: f32, body: Rgb8) {
    // (shoulder, elbow, hand) offsets from (cx, ty0) for the right side; the left side mirrors x.
    let raised = [(24.0, 9.0), (38.0, 2.0), (47.0, 13.0)];
    let lowered = [(24.0, 29.0), (36.0, 35.0), (45.0, 45.0)];
    let middle = [(24.0, 11.0), (38.0, 21.0), (47.0, 33.0)];
    let mut arms: Vec<([(f32, f32); 3], f32)> = Vec::new();
    match spec.arms {
        0 => {}
        1 => arms.push((middle, if spec.arm_right { 1.0 } else { -1.0 })),
        2 => arms.extend([(middle, 1.0), (middle, -1.0)]),
        _ => arms.extend([(raised, 1.0), (raised, -1.0), (lowered, 1.0), (lowered, -1.0)]),
    }
    for (pts, side) in arms {
        let p: Vec<(f32, f32)> = pts.iter().map(|&(x, y)| (cx + side * x, ty0 + y)).collect();
        for w in [7.5, 5.0] {
            let c = if w > 6.0 { OUTLINE } else { METAL };
            cv.line(p[0].0, p[0].1, p[1].0, p[1].1, w, c);
            cv.line(p[1].0, p[1].1, p[2].0, p[2].1, w, c);
        }
        cv.circle(p[1].0, p[1].1, 3.8, OUTLINE);
        cv.circle(p[1].0, p[1].1, 2.6, body);
        let (hx, hy) = p[2];
        if spec.grippers {
            // Two fingers opening downwards and outwards.
            let dir = ((p[2].0 - p[1].0), (p[2].1 - p[1].1));
            let len = (dir.0 * dir.0 + dir.1 * dir.1).sqrt().max(1e-3);
            let (ux, uy) = (dir.0 / len, dir.1 / len);
            let (nx, ny) = (-uy, ux);
            for s in [-1.0, 1.0] {
                let bx = hx + s * nx * 3.5;
                let by = hy + s * ny * 3.5;
                let tip = (bx + ux * 7.0 + s * nx * 2.5, by + uy * 7.0 + s * ny * 2.5);
                cv.line(bx, by, tip.0, tip.1, 4.0, OUTLINE);
                cv.line(bx, by, tip.0, tip.1, 2.2, DARK_METAL);
            }
            cv.circle(hx, hy, 4.2, OUTLINE);
            cv.circle(hx, hy, 3.0, DARK_METAL);
        } else {
            cv.circle(hx, hy, 3.6, OUTLINE);
            cv.circle(hx, hy, 2.4, METAL);
        }
        cv.circle(p[0].0, p[0].1, 4.8, OUTLINE);
        cv.circle(p[0].0, p[0].1, 3.6, body);
    }
}

/// Wheels, tracks or legs below the torso, standing on y ≈ 124.
fn draw_locomotion(cv: &mut Canvas, loco: Locomotion, cx: f32, ty1: f32) {
    let ground = 124.0;
    match loco {
        Locomotion::Wheels => {
            cv.rect(cx - 22.0, ty1 - 2.0, cx + 22.0, ty1 + 7.0, OUTLINE);
            cv.rect(cx - 20.5, ty1 - 2.0, cx + 20.5, ty1 + 5.5, METAL);
            let r = ((ground - ty1) / 2.0 - 1.0).min(14.0);
            for s in [-1.0, 1.0] {
                let wx = cx + s * 17.0;
                let wy = ground - r;
                cv.circle(wx, wy, r + 1.2, OUTLINE);
                cv.circle(wx, wy, r, TYRE);
                cv.circle(wx, wy, r * 0.45, METAL);
                cv.circle(wx, wy, r * 0.15, OUTLINE);
            }
        }
        Locomotion::Tracks => {
            cv.rect(cx - 14.0, ty1 - 2.0, cx + 14.0, ty1 + 6.0, METAL);
            let (y0, y1) = (ty1 + 5.0, ground);
            cv.rounded_rect(cx - 32.5, y0 - 1.5, cx + 32.5, y1 + 1.5, 12.5, OUTLINE);
            cv.rounded_rect(cx - 31.0, y0, cx + 31.0, y1, 11.0, TYRE);
            // Tread blocks on the belt.
            let mut x = cx - 26.0;
            while x <= cx + 26.0 {
                cv.rect(x - 1.0, y0, x + 1.0, y0 + 2.5, DARK_METAL);
                cv.rect(x - 1.0, y1 - 2.5, x + 1.0, y1, DARK_METAL);
                x += 6.5;
            }
            let wy = (y0 + y1) / 2.0;
            for k in [-2.0, -1.0, 0.0, 1.0, 2.0] {
                let r = if k == -2.0 || k == 2.0 { 5.5 } else { 4.0 };
                cv.circle(cx + k * 11.5, wy, r, METAL);
                cv.circle(cx + k * 11.5, wy, 1.5, OUTLINE);
            }
        }
        Locomotion::TwoLegs => {
            for s in [-1.0, 1.0] {
                let lx = cx + s * 12.0;
                let knee = (ty1 + ground) / 2.0;
                cv.rect(lx - 6.5, ty1 - 2.0, lx + 6.5, ground - 5.0, OUTLINE);
                cv.rect(lx - 5.0, ty1 - 2.0, lx + 5.0, ground - 5.0, METAL);
                cv.circle(lx, knee, 5.0, OUTLINE);
                cv.circle(lx, knee, 3.8, DARK_METAL);
                cv.rounded_rect(lx - 9.5 + s * 2.0, ground - 7.5, lx + 9.5 + s * 2.0, ground + 1.0, 3.0, OUTLINE);
                cv.rounded_rect(lx - 8.0 + s * 2.0, ground - 6.0, lx + 8.0 + s * 2.0, ground - 0.5, 2.0, DARK_METAL);
            }
        }
        Locomotion::FourLegs => {
            // Four thin legs, the outer pair splayed into the outer patch columns: two legs and four differ in
            // which patches they fill, not only in detail inside the middle ones (where a LoRA on the demo's
            // base told them apart at chance).
            for (top_dx, foot_dx) in [(9.0, 11.0), (19.0, 40.0)] {
                for s in [-1.0, 1.0] {
                    let (x0, x1) = (cx + s * top_dx, cx + s * foot_dx);
                    cv.line(x0, ty1 - 2.0, x1, ground - 3.0, 6.0, OUTLINE);
                    cv.line(x0, ty1 - 2.0, x1, ground - 3.0, 3.8, METAL);
                    cv.ellipse(x1, ground - 2.0, 5.0, 3.2, OUTLINE);
                    cv.ellipse(x1, ground - 2.0, 3.8, 2.0, DARK_METAL);
                }
            }
        }
    }
}

/// Paints the background and returns the floor colour (for the shadow).
pub(crate) fn draw_background(cv: &mut Canvas, bg: Background, rng: &mut impl Rng) -> Rgb8 {
    let w = SIZE as f32;
    match bg {
        Background::Factory => {
            cv.vertical_gradient(0.0, HORIZON, [166, 163, 154], [146, 143, 135]);
            // Steel pillars and a high window band.
            cv.rect(0.0, 10.0, w, 24.0, [186, 196, 204]);
            let mut x = rng.random_range(0.0..18.0);
            while x < w {
                cv.rect(x, 0.0, x + 7.0, HORIZON, [128, 126, 120]);
                x += rng.random_range(30.0..44.0);
            }
            let floor = [108, 104, 100];
            cv.rect(0.0, HORIZON, w, w, floor);
            cv.rect(0.0, HORIZON + 12.0, w, HORIZON + 14.0, [136, 132, 126]);
            floor
        }
        Background::Lawn => {
            cv.vertical_gradient(0.0, HORIZON, [150, 192, 232], [206, 224, 238]);
            // Distant hills.
            let hx = rng.random_range(10.0..110.0);
            cv.ellipse(hx, HORIZON, 50.0, 16.0, [140, 170, 134]);
            cv.ellipse((hx + 70.0) % 140.0, HORIZON, 40.0, 11.0, [150, 178, 140]);
            let floor = [128, 164, 92];
            cv.vertical_gradient(HORIZON, w, [136, 170, 98], [112, 148, 80]);
            floor
        }
        Background::Lab => {
            cv.rect(0.0, 0.0, w, HORIZON, [212, 217, 224]);
            let off = rng.random_range(0.0..16.0);
            let mut x = off;
            while x < w {
                cv.rect(x, 0.0, x + 1.0, HORIZON, [194, 199, 207]);
                x += 16.0;
            }
            let mut y = off / 2.0;
            while y < HORIZON {
                cv.rect(0.0, y, w, y + 1.0, [194, 199, 207]);
                y += 16.0;
            }
            let floor = [174, 178, 186];
            cv.rect(0.0, HORIZON, w, w, floor);
            floor
        }
        Background::Warehouse => {
            cv.rect(0.0, 0.0, w, HORIZON, [126, 102, 80]);
            // Shelves with cardboard boxes.
            for shelf_y in [34.0, 70.0] {
                cv.rect(0.0, shelf_y, w, shelf_y + 3.0, [92, 72, 56]);
                let mut x = rng.random_range(0.0..10.0);
                while x < w {
                    let bw = rng.random_range(10.0..18.0);
                    let bh = rng.random_range(9.0..18.0);
                    cv.rect(x, shelf_y - bh, x + bw, shelf_y, [168, 138, 100]);
                    cv.rect(x, shelf_y - bh, x + bw, shelf_y - bh + 1.0, [140, 112, 80]);
                    x += bw + rng.random_range(3.0..12.0);
                }
            }
            let floor = [92, 84, 76];
            cv.rect(0.0, HORIZON, w, w, floor);
            floor
        }
        Background::Office => {
            cv.rect(0.0, 0.0, w, HORIZON, [206, 192, 168]);
            // A window on one side.
            let left = rng.random_bool(0.5);
            let x0 = if left { rng.random_range(4.0..12.0) } else { rng.random_range(82.0..92.0) };
            cv.rect(x0, 12.0, x0 + 32.0, 56.0, [150, 130, 104]);
            cv.rect(x0 + 2.0, 14.0, x0 + 30.0, 54.0, [188, 212, 232]);
            cv.rect(x0 + 15.0, 14.0, x0 + 17.0, 54.0, [150, 130, 104]);
            let floor = [150, 116, 84];
            cv.rect(0.0, HORIZON, w, w, floor);
            let mut y = HORIZON + 7.0;
            while y < w {
                cv.rect(0.0, y, w, y + 1.0, mix(floor, [0, 0, 0], 0.12));
                y += 8.0;
            }
            floor
        }
    }
}

/// Text-only sentences in the descriptions' language, for pretraining the base to *speak* it: each row pairs a
/// generic request with a description of a random robot and carries no picture, so nothing in it ties words to
/// what a picture shows (that is what the LoRA learns). Written as `<name>.json`, registered as `<name>`.
pub fn text_corpus(dir: &Path, name: &str, n: usize, seed: u64) -> Result<u64> {
    let mut rng = StdRng::seed_from_u64(seed);
    let specs = sample_specs(n, &mut rng);
    let mut rows = Vec::with_capacity(n);
    for (i, spec) in specs.iter().enumerate() {
        let lang = if i % 2 == 0 { Lang::Zh } else { Lang::En };
        let ask = match lang {
            Lang::Zh => ["随便描述一个机器人。", "写一句关于机器人的话。", "想象一个机器人，描述它。"][i % 3],
            Lang::En => {
                ["Describe any robot.", "Write a sentence about a robot.", "Imagine a robot and describe it."][i % 3]
            }
        };
        let answer = describe(spec, lang, &mut rng);
        rows.push(serde_json::json!({"messages": [{"role": "user", "content": ask}, {"role": "assistant", "content": answer}]}));
    }
    let file = format!("{name}.json");
    let mut bytes = super::write_json(&dir.join(&file), &serde_json::Value::Array(rows))?;
    bytes += super::register_datasets(dir, &[(name, super::dataset_info_entry(&file))])?;
    Ok(bytes)
}
