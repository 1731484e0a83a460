//! The GGUF container (version 3, little-endian), as llama.cpp's `gguf.cpp` reads it: a header, typed key/value
//! metadata, one info record per tensor (name, dimensions innermost first, type, offset), then the tensor data,
//! each tensor starting on a multiple of the alignment (32) and the offsets contiguous in info order.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

pub const MAGIC: u32 = 0x4655_4747; // "GGUF"
pub const VERSION: u32 = 3;
pub const ALIGNMENT: u64 = 32;

/// A metadata value. Arrays hold elements of one type (llama.cpp checks scalar types strictly).
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::Str(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    fn write(&self, w: &mut impl Write) -> std::io::Result<()> {
        match self {
            Value::U8(v) => w.write_all(&[*v]),
            Value::I8(v) => w.write_all(&v.to_le_bytes()),
            Value::U16(v) => w.write_all(&v.to_le_bytes()),
            Value::I16(v) => w.write_all(&v.to_le_bytes()),
            Value::U32(v) => w.write_all(&v.to_le_bytes()),
            Value::I32(v) => w.write_all(&v.to_le_bytes()),
            Value::F32(v) => w.write_all(&v.to_le_bytes()),
            Value::Bool(v) => w.write_all(&[*v as u8]),
            Value::Str(s) => write_str(w, s),
            Value::U64(v) => w.write_all(&v.to_le_bytes()),
            Value::I64(v) => w.write_all(&v.to_le_bytes()),
            Value::F64(v) => w.write_all(&v.to_le_bytes()),
            Value::Array(items) => {
                let ty = items.first().map_or(5, Value::type_id);
                w.write_all(&ty.to_le_bytes())?;
                w.write_all(&(items.len() as u64).to_le_bytes())?;
                items.iter().try_for_each(|v| v.write(w))
            }
        }
    }

    fn read(r: &mut impl Read, ty: u32, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(u8::from_le_bytes(bytes(r)?)),
            1 => Value::I8(i8::from_le_bytes(bytes(r)?)),
            2 => Value::U16(u16::from_le_bytes(bytes(r)?)),
            3 => Value::I16(i16::from_le_bytes(bytes(r)?)),
            4 => Value::U32(u32::from_le_bytes(bytes(r)?)),
            5 => Value::I32(i32::from_le_bytes(bytes(r)?)),
            6 => Value::F32(f32::from_le_bytes(bytes(r)?)),
            7 => Value::Bool(u8::from_le_bytes(bytes(r)?) != 0),
            8 => Value::Str(read_str(r)?),
            9 if depth == 0 => {
                let ety = u32::from_le_bytes(bytes(r)?);
                let n = u64::from_le_bytes(bytes(r)?);
                if n > 1 << 28 {
                    bail!("an array of {n} elements");
                }
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(Value::read(r, ety, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(u64::from_le_bytes(bytes(r)?)),
            11 => Value::I64(i64::from_le_bytes(bytes(r)?)),
            12 => Value::F64(f64::from_le_bytes(bytes(r)?)),
            _ => bail!("unknown value type {ty}"),
        })
    }
}

fn bytes<const N: usize>(r: &mut impl Read) -> std::io::Result<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)?;
    Ok(b)
}

fn write_str(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn read_str(r: &mut impl Read) -> Result<String> {
    let n = u64::from_le_bytes(bytes(r)?);
    if n > 1 << 30 {
        bail!("a string of {n} bytes");
    }
    let mut b = vec![0u8; n as usize];
    r.read_exact(&mut b)?;
    String::from_utf8(b).context("a string that is not UTF-8")
}

/// Tensor types ferrotune writes (ggml's ids; block = values per block, bytes per block).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q5_0,
    Q8_0,
    Q4K,
    Q6K,
    BF16,
}

impl GgmlType {
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q5_0 => 6,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4K => 12,
            GgmlType::Q6K => 14,
            GgmlType::BF16 => 30,
        }
    }

    pub fn from_id(id: u32) -> Option<Self> {
        [Self::F32, Self::F16, Self::Q5_0, Self::Q8_0, Self::Q4K, Self::Q6K, Self::BF16]
            .into_iter()
            .find(|t| t.id() == id)
    }

    /// (values per block, bytes per block)
    pub fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q5_0 => (32, 22),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q4K => (256, 144),
            GgmlType::Q6K => (256, 210),
        }
    }

    /// llama.cpp's name (`Q4_K`, `BF16`, ...).
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q6K => "Q6_K",
            GgmlType::BF16 => "BF16",
        }
    }

    /// Bytes of a tensor of this type with `shape` (PyTorch order: the last dimension is the row).
    pub fn bytes(self, shape: &[usize]) -> Result<u64> {
        let (blk, size) = self.block();
        let row = *shape.last().unwrap_or(&1);
        if !row.is_multiple_of(blk) {
            bail!("rows of {row} values do not split into {} blocks of {blk}", self.name());
        }
        let rows: usize = shape[..shape.len().saturating_sub(1)].iter().product();
        Ok((rows * (row / blk) * size) as u64)
    }
}

/// A tensor to write: name, shape in PyTorch order, type.
#[derive(Clone, Debug)]
pub struct TensorPlan {
    pub name: String,
    pub shape: Vec<usize>,
    pub ty: GgmlType,
}

/// Writes a GGUF file: header and infos at creation, then each tensor's bytes in plan order. The file is written
/// under a temporary name and renamed into place by [`Writer::finish`], so an interrupted export leaves no
/// truncated file under the final name.
pub struct Writer {
    out: BufWriter<File>,
    tmp: PathBuf,
    path: PathBuf,
    plan: Vec<(TensorPlan, u64)>,
    next: usize,
    /// Bytes of the next tensor written so far by [`Writer::write_part`].
    partial: u64,
}

impl Writer {
    pub fn create(path: &Path, kv: &[(String, Value)], plan: Vec<TensorPlan>) -> Result<Self> {
        for t in &plan {
            if t.name.len() >= 64 {
                bail!("GGUF tensor name {:?} is longer than llama.cpp's 63 bytes", t.name);
            }
        }
        let sizes =
            plan.iter().map(|t| t.ty.bytes(&t.shape).with_context(|| t.name.clone())).collect::<Result<Vec<_>>>()?;
        let name = path.file_name().and_then(|n| n.to_str()).context("a GGUF path without a file name")?;
        let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
        let file = File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        let mut out = BufWriter::with_capacity(8 << 20, file);
        let mut header = Vec::new();
        header.extend_from_slice(&MAGIC.to_le_bytes());
        header.extend_from_slice(&VERSION.to_le_bytes());
        header.extend_from_slice(&(plan.len() as u64).to_le_bytes());
        header.extend_from_slice(&(kv.len() as u64).to_le_bytes());
        for (k, v) in kv {
            write_str(&mut header, k)?;
            header.extend_from_slice(&v.type_id().to_le_bytes());
            v.write(&mut header)?;
        }
        let mut offset = 0u64;
        let mut planned = Vec::with_capacity(plan.len());
        for (t, size) in plan.into_iter().zip(sizes) {
            write_str(&mut header, &t.name)?;
            header.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
            for d in t.shape.iter().rev() {
                header.extend_from_slice(&(*d as u64).to_le_bytes());
            }
            header.extend_from_slice(&t.ty.id().to_le_bytes());
            header.extend_from_slice(&offset.to_le_bytes());
            planned.push((t, size));
            offset += size.next_multiple_of(ALIGNMENT);
        }
        header.resize((header.len() as u64).next_multiple_of(ALIGNMENT) as usize, 0);
        out.write_all(&header)?;
        Ok(Self { out, tmp, path: path.to_path_buf(), plan: planned, next: 0, partial: 0 })
    }

    /// The next tensor's data (its plan's name, exactly its planned size).
    pub fn write_tensor(&mut self, name: &str, data: &[u8]) -> Result<()> {
        self.write_part(name, data)?;
        self.end_tensor(name)
    }

    /// A piece of the next tensor's data (rows in order); [`Writer::end_tensor`] closes it.
    pub fn write_part(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let Some((t, size)) = self.plan.get(self.next) else { bail!("{name}: more tensors than planned") };
        if t.name != name || self.partial + data.len() as u64 > *size {
            bail!("writing {} more bytes of {name} where {} ({size} bytes) is planned", data.len(), t.name);
        }
        self.out.write_all(data)?;
        self.partial += data.len() as u64;
        Ok(())
    }

    /// Closes the next tensor: all its planned bytes written, then the padding to the alignment.
    pub fn end_tensor(&mut self, name: &str) -> Result<()> {
        let Some((t, size)) = self.plan.get(self.next) else { bail!("{name}: more tensors than planned") };
        if t.name != name || self.partial != *size {
            bail!("{name}: {} of {size} bytes written", self.partial);
        }
        let pad = size.next_multiple_of(ALIGNMENT) - size;
        self.out.write_all(&vec![0u8; pad as usize])?;
        self.next += 1;
        self.partial = 0;
        Ok(())
    }

    pub fn finish(mut self) -> Result<()> {
        if self.next != self.plan.len() {
            bail!("{}: {} of {} tensors written", self.path.display(), self.next, self.plan.len());
        }
        self.out.flush()?;
        self.out.get_ref().sync_all()?;
        std::fs::rename(&self.tmp, &self.path)
            .with_context(|| format!("moving {} to {}", self.tmp.display(), self.path.display()))
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Not finished (an error on the way): the partial file goes.
        if self.tmp.exists() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// A tensor's info as read back.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: innermost (the row) first.
    pub ne: Vec<u64>,
    pub type_id: u32,
    pub offset: u64,
}

/// A GGUF file's header, metadata and tensor infos.
#[derive(Clone, Debug)]
pub struct Gguf {
    pub path: PathBuf,
    pub kv: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    pub data_start: u64,
}

impl Gguf {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        let mut r = BufReader::new(file);
        let ctx = || format!("{}: not a readable GGUF file", path.display());
        let magic = u32::from_le_bytes(bytes(&mut r).with_context(ctx)?);
        let version = u32::from_le_bytes(bytes(&mut r).with_context(ctx)?);
        if magic != MAGIC || version != VERSION {
            bail!("{}: magic {magic:#x} version {version}, expected a GGUF v3 file", path.display());
        }
        let n_tensors = u64::from_le_bytes(bytes(&mut r)?);
        let n_kv = u64::from_le_bytes(bytes(&mut r)?);
        if n_tensors > 1 << 20 || n_kv > 1 << 20 {
            bail!("{}: {n_tensors} tensors and {n_kv} keys", path.display());
        }
        let mut kv = Vec::with_capacity(n_kv as usize);
        for _ in 0..n_kv {
            let key = read_str(&mut r).with_context(ctx)?;
            let ty = u32::from_le_bytes(bytes(&mut r)?);
            let v = Value::read(&mut r, ty, 0).with_context(|| format!("{}: key {key}", path.display()))?;
            kv.push((key, v));
        }
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = read_str(&mut r).with_context(ctx)?;
            let n_dims = u32::from_le_bytes(bytes(&mut r)?);
            if n_dims > 4 {
                bail!("{}: tensor {name} has {n_dims} dimensions", path.display());
            }
            let ne = (0..n_dims).map(|_| Ok(u64::from_le_bytes(bytes(&mut r)?))).collect::<Result<Vec<_>>>()?;
            let type_id = u32::from_le_bytes(bytes(&mut r)?);
            let offset = u64::from_le_bytes(bytes(&mut r)?);
            tensors.push(TensorInfo { name, ne, type_id, offset });
        }
        let align = match kv.iter().find(|(k, _)| k == "general.alignment") {
            Some((_, Value::U32(a))) => *a as u64,
            _ => ALIGNMENT,
        };
        let data_start = r.stream_position()?.next_multiple_of(align);
        Ok(Self { path: path.to_path_buf(), kv, tensors, data_start })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.kv.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// A tensor's raw bytes (types ferrotune writes).
    pub fn tensor_bytes(&self, name: &str) -> Result<Vec<u8>> {
        let t = self.tensors.iter().find(|t| t.name == name).with_context(|| format!("no tensor {name}"))?;
        let ty = GgmlType::from_id(t.type_id).with_context(|| format!("{name}: type {} not read here", t.type_id))?;
        let shape: Vec<usize> = t.ne.iter().rev().map(|&d| d as usize).collect();
        let n = ty.bytes(&shape)? as usize;
        let mut f = File::open(&self.path)?;
        f.seek(SeekFrom::Start(self.data_start + t.offset))?;
        let mut buf = vec![0u8; n];
        f.read_exact(&mut buf).with_context(|| format!("{}: {name} is cut short", self.path.display()))?;
        Ok(buf)
    }
}
