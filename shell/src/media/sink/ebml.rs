//! Just enough EBML (RFC 8794) writing for a streaming Matroska muxer: element IDs,
//! variable-length sizes (including the "unknown size" marker that lets a reader cope with a
//! file cut short) and the few element types the recorder uses. Writes into a `Vec<u8>` so
//! the caller decides when bytes reach the file.

/// The 8-byte "unknown size" (all value bits set). Readers then end the element at the next
/// element that cannot be its child, which is what makes a killed recording readable.
pub const UNKNOWN_SIZE: [u8; 8] = [0x01, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];

/// Largest size an 8-byte vint can carry (2^56 - 2; 2^56 - 1 means unknown).
pub const MAX_SIZE: u64 = (1 << 56) - 2;

/// Matroska element IDs (with their marker bits, as written).
pub mod id {
    pub const EBML: u32 = 0x1A45_DFA3;
    pub const EBML_VERSION: u32 = 0x4286;
    pub const EBML_READ_VERSION: u32 = 0x42F7;
    pub const EBML_MAX_ID_LENGTH: u32 = 0x42F2;
    pub const EBML_MAX_SIZE_LENGTH: u32 = 0x42F3;
    pub const DOC_TYPE: u32 = 0x4282;
    pub const DOC_TYPE_VERSION: u32 = 0x4287;
    pub const DOC_TYPE_READ_VERSION: u32 = 0x4285;
    pub const SEGMENT: u32 = 0x1853_8067;
    pub const INFO: u32 = 0x1549_A966;
    pub const TIMESTAMP_SCALE: u32 = 0x2A_D7B1;
    pub const MUXING_APP: u32 = 0x4D80;
    pub const WRITING_APP: u32 = 0x5741;
    pub const DATE_UTC: u32 = 0x4461;
    pub const DURATION: u32 = 0x4489;
    pub const VOID: u32 = 0xEC;
    pub const TRACKS: u32 = 0x1654_AE6B;
    pub const TRACK_ENTRY: u32 = 0xAE;
    pub const TRACK_NUMBER: u32 = 0xD7;
    pub const TRACK_UID: u32 = 0x73C5;
    pub const TRACK_TYPE: u32 = 0x83;
    pub const FLAG_LACING: u32 = 0x9C;
    pub const LANGUAGE: u32 = 0x22_B59C;
    pub const CODEC_ID: u32 = 0x86;
    pub const CODEC_PRIVATE: u32 = 0x63A2;
    pub const VIDEO: u32 = 0xE0;
    pub const PIXEL_WIDTH: u32 = 0xB0;
    pub const PIXEL_HEIGHT: u32 = 0xBA;
    pub const AUDIO: u32 = 0xE1;
    pub const SAMPLING_FREQUENCY: u32 = 0xB5;
    pub const CHANNELS: u32 = 0x9F;
    pub const BIT_DEPTH: u32 = 0x6264;
    pub const CLUSTER: u32 = 0x1F43_B675;
    pub const TIMESTAMP: u32 = 0xE7;
    pub const SIMPLE_BLOCK: u32 = 0xA3;
}

/// Appends an element ID (1 to 4 bytes, leading zero bytes dropped).
pub fn put_id(out: &mut Vec<u8>, id: u32) {
    let bytes = id.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count().min(3);
    out.extend(bytes.iter().skip(skip));
}

/// Appends `size` as the shortest vint that holds it (sizes above [`MAX_SIZE`] are clamped;
/// nothing the recorder writes comes near).
pub fn put_size(out: &mut Vec<u8>, size: u64) {
    let size = size.min(MAX_SIZE);
    // A vint of n bytes carries 7n value bits; all-ones is reserved for "unknown".
    let len = (1..=8u32)
        .find(|n| size < (1u64 << (7 * n)) - 1)
        .unwrap_or(8);
    out.extend_from_slice(&sized_vint(size, len));
}

/// `size` as a vint of exactly 8 bytes, for sizes patched in place over [`UNKNOWN_SIZE`].
pub fn size8(size: u64) -> [u8; 8] {
    let mut b = size.min(MAX_SIZE).to_be_bytes();
    b[0] = 0x01;
    b
}

/// `value` as a vint of `len` bytes (1..=8); the caller checks that it fits.
fn sized_vint(value: u64, len: u32) -> Vec<u8> {
    let len = len.clamp(1, 8);
    let marked = value | (1u64 << (7 * len));
    let bytes = marked.to_be_bytes();
    bytes.iter().skip(8 - len as usize).copied().collect()
}

/// Appends a complete element with a binary body.
pub fn put_bytes(out: &mut Vec<u8>, id: u32, body: &[u8]) {
    put_id(out, id);
    put_size(out, body.len() as u64);
    out.extend_from_slice(body);
}

/// Appends an unsigned-integer element in the fewest bytes (at least one).
pub fn put_uint(out: &mut Vec<u8>, id: u32, value: u64) {
    let bytes = value.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count().min(7);
    put_bytes(out, id, bytes.get(skip..).unwrap_or(&bytes));
}

/// Appends a signed-integer element as 8 bytes (only DateUTC uses it).
pub fn put_int8(out: &mut Vec<u8>, id: u32, value: i64) {
    put_bytes(out, id, &value.to_be_bytes());
}

/// Appends an 8-byte float element.
pub fn put_float(out: &mut Vec<u8>, id: u32, value: f64) {
    put_bytes(out, id, &value.to_be_bytes());
}

/// Appends a string element (ASCII / UTF-8, no terminator).
pub fn put_str(out: &mut Vec<u8>, id: u32, value: &str) {
    put_bytes(out, id, value.as_bytes());
}

/// Appends a master element whose children `body` writes.
pub fn put_master(out: &mut Vec<u8>, id: u32, body: impl FnOnce(&mut Vec<u8>)) {
    let mut inner = Vec::new();
    body(&mut inner);
    put_bytes(out, id, &inner);
}

/// Appends a Void element occupying exactly `total` bytes (2..=127 here), a placeholder that
/// a later element of the same length overwrites.
pub fn put_void(out: &mut Vec<u8>, total: usize) {
    let body = total.saturating_sub(2).min(126);
    put_id(out, id::VOID);
    put_size(out, body as u64);
    out.resize(out.len() + body, 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_sizes_use_the_shortest_form() {
        let mut v = Vec::new();
        put_id(&mut v, id::SEGMENT);
        put_id(&mut v, id::TRACK_NUMBER);
        assert_eq!(v, [0x18, 0x53, 0x80, 0x67, 0xD7]);

        let enc = |n| {
            let mut v = Vec::new();
            put_size(&mut v, n);
            v
        };
        assert_eq!(enc(0), [0x80]);
        assert_eq!(enc(126), [0xFE]);
        // 127 would be all ones in one byte (= unknown), so it takes two.
        assert_eq!(enc(127), [0x40, 0x7F]);
        assert_eq!(enc(16_382), [0x7F, 0xFE]);
        assert_eq!(enc(16_383), [0x20, 0x3F, 0xFF]);
        assert_eq!(size8(5), [0x01, 0, 0, 0, 0, 0, 0, 5]);
        assert_ne!(size8(u64::MAX), UNKNOWN_SIZE);
    }

    #[test]
    fn uint_and_void_lengths() {
        let mut v = Vec::new();
        put_uint(&mut v, id::TRACK_NUMBER, 0);
        assert_eq!(v, [0xD7, 0x81, 0x00]);
        v.clear();
        put_uint(&mut v, id::TIMESTAMP_SCALE, 1_000_000);
        assert_eq!(v, [0x2A, 0xD7, 0xB1, 0x83, 0x0F, 0x42, 0x40]);
        v.clear();
        put_void(&mut v, 11);
        assert_eq!(v.len(), 11);
        let mut d = Vec::new();
        put_float(&mut d, id::DURATION, 1.0);
        assert_eq!(d.len(), 11, "Duration must fit the Void reserved for it");
    }
}
