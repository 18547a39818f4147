//! The room model as OWT users know it: name, limits, roles with publish/subscribe
//! permissions, views (the settings of each mixed stream) and the codec lists a room
//! accepts and offers. JSON field names follow OWT's REST API (camelCase) so OWT
//! management scripts can create and read rooms unchanged.
//!
//! Every field has a default, so `{"name": "x"}` is a complete room; unknown fields are
//! rejected with their path so a typo does not silently fall back to a default.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A validation failure naming the offending field path (e.g. `views[0].video.framerate`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct RoomError {
    /// Path of the field in the room JSON.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl RoomError {
    fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        RoomError { field: field.into(), reason: reason.into() }
    }
}

/// A conference room: its configuration, persisted by the room store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Room {
    /// Room id (24 hex digits, or a name chosen by the operator for the default room).
    #[serde(alias = "_id")]
    pub id: String,
    /// Human-readable name; required and non-empty.
    pub name: String,
    /// Maximum participants at once; -1 means unlimited.
    pub participant_limit: i64,
    /// Maximum published streams at once; -1 means unlimited.
    pub input_limit: i64,
    /// The roles a token may name, with their permissions.
    pub roles: Vec<Role>,
    /// One mixed stream per view; an empty list means no mixing in this room.
    pub views: Vec<View>,
    /// Codecs accepted from publishers.
    pub media_in: MediaIn,
    /// Codecs and parameters offered to subscribers.
    pub media_out: MediaOut,
    /// Which room events are notified to participants.
    pub notifying: Notifying,
    /// Tessera extension: mix every new forward stream into every view automatically.
    /// OWT leaves mixing to a REST PATCH per stream; set false for that behaviour.
    pub auto_mix: bool,
    /// OWT's active-audio selection flag, kept for compatibility.
    pub select_active_audio: bool,
    /// OWT's bandwidth-adaptation flag, kept for compatibility.
    pub enable_bandwidth_adaptation: bool,
    /// OWT's transcoding switches, stored as given (Tessera forwards without transcoding).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transcoding: Option<serde_json::Value>,
    /// OWT's SIP settings, stored as given (Tessera has no SIP gateway).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sip: Option<serde_json::Value>,
}

impl Default for Room {
    fn default() -> Self {
        Room {
            id: String::new(),
            name: String::new(),
            participant_limit: -1,
            input_limit: -1,
            roles: Role::defaults(),
            views: vec![View::default()],
            media_in: MediaIn::default(),
            media_out: MediaOut::default(),
            notifying: Notifying::default(),
            auto_mix: true,
            select_active_audio: false,
            enable_bandwidth_adaptation: false,
            transcoding: None,
            sip: None,
        }
    }
}

/// A role: what participants holding it may publish and subscribe to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Role {
    /// Role name as used in tokens.
    pub role: String,
    /// What this role may publish.
    #[serde(default)]
    pub publish: AudioVideo,
    /// What this role may subscribe to.
    #[serde(default)]
    pub subscribe: AudioVideo,
}

/// A pair of audio/video permission flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AudioVideo {
    /// Audio allowed.
    pub audio: bool,
    /// Video allowed.
    pub video: bool,
}

impl AudioVideo {
    const BOTH: AudioVideo = AudioVideo { audio: true, video: true };
    const NONE: AudioVideo = AudioVideo { audio: false, video: false };

    /// Whether `kind` is allowed.
    pub fn allows(self, kind: crate::agent::MediaKind) -> bool {
        match kind {
            crate::agent::MediaKind::Audio => self.audio,
            crate::agent::MediaKind::Video => self.video,
        }
    }
}

impl Role {
    /// OWT's default roles.
    pub fn defaults() -> Vec<Role> {
        let r = |role: &str, publish, subscribe| Role { role: role.into(), publish, subscribe };
        let audio = AudioVideo { audio: true, video: false };
        let video = AudioVideo { audio: false, video: true };
        vec![
            r("presenter", AudioVideo::BOTH, AudioVideo::BOTH),
            r("viewer", AudioVideo::NONE, AudioVideo::BOTH),
            r("audio_only_presenter", audio, audio),
            r("video_only_viewer", AudioVideo::NONE, video),
            r("sip", AudioVideo::BOTH, AudioVideo::BOTH),
        ]
    }
}

/// An audio codec description as OWT writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AudioFormat {
    /// Codec name, lower case (`opus`, `pcmu`, ...).
    pub codec: String,
    /// Sample rate in Hz.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample_rate: Option<u32>,
    /// Channel count.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel_num: Option<u32>,
}

impl AudioFormat {
    fn new(codec: &str, sample_rate: Option<u32>, channel_num: Option<u32>) -> Self {
        AudioFormat { codec: codec.into(), sample_rate, channel_num }
    }

    /// Opus, 48 kHz stereo: the default mixed audio format.
    pub fn opus() -> Self {
        Self::new("opus", Some(48000), Some(2))
    }
}

/// A video codec description as OWT writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VideoFormat {
    /// Codec name, lower case (`vp8`, `h264`, `vp9`).
    pub codec: String,
    /// H.264 profile (`CB`, `B`, `M`, `H`) when relevant.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
}

impl VideoFormat {
    fn new(codec: &str, profile: Option<&str>) -> Self {
        VideoFormat { codec: codec.into(), profile: profile.map(Into::into) }
    }
}

/// Codecs a room accepts from publishers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MediaIn {
    /// Accepted audio codecs.
    pub audio: Vec<AudioFormat>,
    /// Accepted video codecs.
    pub video: Vec<VideoFormat>,
}

impl Default for MediaIn {
    fn default() -> Self {
        MediaIn {
            audio: vec![AudioFormat::opus(), AudioFormat::new("pcmu", None, None), AudioFormat::new("pcma", None, None)],
            video: vec![VideoFormat::new("vp8", None), VideoFormat::new("h264", None), VideoFormat::new("vp9", None)],
        }
    }
}

/// Codecs and parameters a room offers to subscribers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MediaOut {
    /// Offered audio codecs.
    pub audio: Vec<AudioFormat>,
    /// Offered video codecs and parameter choices.
    pub video: MediaOutVideo,
}

impl Default for MediaOut {
    fn default() -> Self {
        MediaOut { audio: MediaIn::default().audio, video: MediaOutVideo::default() }
    }
}

/// Video part of [`MediaOut`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MediaOutVideo {
    /// Offered video codecs.
    pub format: Vec<VideoFormat>,
    /// Offered parameter variants (OWT's strings such as `"x3/4"`, `"hd720p"`, `"x0.8"`).
    pub parameters: serde_json::Value,
}

impl Default for MediaOutVideo {
    fn default() -> Self {
        MediaOutVideo {
            format: vec![VideoFormat::new("vp8", None), VideoFormat::new("h264", Some("CB")), VideoFormat::new("vp9", None)],
            parameters: serde_json::json!({
                "resolution": ["x3/4", "x2/3", "x1/2", "x1/3", "x1/4", "hd1080p", "hd720p", "svga", "vga", "qvga", "cif"],
                "framerate": [6, 12, 15, 24, 30, 48, 60],
                "bitrate": ["x0.8", "x0.6", "x0.4", "x0.2"],
                "keyFrameInterval": [100, 30, 5, 2, 1]
            }),
        }
    }
}

/// Which room events reach participants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Notifying {
    /// Send `participant` join/leave notifications.
    pub participant_activities: bool,
    /// Send `stream` add/update/remove notifications.
    pub stream_change: bool,
}

impl Default for Notifying {
    fn default() -> Self {
        Notifying { participant_activities: true, stream_change: true }
    }
}

/// A view: the settings of one mixed stream of the room.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct View {
    /// Label, unique in the room; the mixed stream id is `<roomId>-<label>`.
    pub label: String,
    /// Mixed audio settings, or `false` for a video-only view.
    #[serde(with = "false_or")]
    pub audio: Option<ViewAudio>,
    /// Mixed video settings, or `false` for an audio-only view.
    #[serde(with = "false_or")]
    pub video: Option<ViewVideo>,
}

impl Default for View {
    fn default() -> Self {
        View { label: "common".into(), audio: Some(ViewAudio::default()), video: Some(ViewVideo::default()) }
    }
}

/// Mixed audio settings of a view.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ViewAudio {
    /// Output audio format.
    pub format: AudioFormat,
    /// Voice activity detection (drives the active input).
    pub vad: bool,
}

impl Default for ViewAudio {
    fn default() -> Self {
        ViewAudio { format: AudioFormat::opus(), vad: true }
    }
}

/// Mixed video settings of a view.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ViewVideo {
    /// Output video format.
    pub format: VideoFormat,
    /// Output resolution, frame rate, bitrate and keyframe interval.
    pub parameters: VideoParameters,
    /// Most inputs composed at once (1..=256).
    pub max_input: u32,
    /// OWT's motion factor, used to derive a bitrate when none is set.
    pub motion_factor: f64,
    /// Colour of regions without an input.
    pub bg_color: Rgb,
    /// Keep the active speaker in the primary region.
    pub keep_active_input_primary: bool,
    /// Layout template and custom regions.
    pub layout: Layout,
    /// Lower-resolution layers of the mixed video, as fractions of `parameters.resolution`
    /// (OWT's `"x1/2"` notation; Tessera addition). Subscribers take one like a simulcast
    /// layer (by `rid`, by resolution, or on `auto` by bandwidth); each is encoded only
    /// while someone takes it. Empty: one encoding (and left out of the room's JSON).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<String>,
}

/// Most lower layers a view may have (with its full one, the SFU's layer limit).
pub const MAX_VIEW_LAYERS: usize = 3;

impl ViewVideo {
    /// The mixed video's layers, full size first: `(rid, resolution, scale)`. Entries
    /// that do not parse are left out (validation refuses them).
    pub fn layer_sizes(&self) -> Vec<(String, Resolution, (u32, u32))> {
        let full = self.parameters.resolution;
        let mut out = vec![("x1".to_string(), full, (1, 1))];
        for l in &self.layers {
            if let Some((n, d)) = parse_fraction(l) {
                // Even sizes, as the encoders want them.
                let scale = |v: u32| ((u64::from(v) * u64::from(n) / u64::from(d)) as u32) & !1;
                out.push((format!("x{n}_{d}"), Resolution { width: scale(full.width), height: scale(full.height) }, (n, d)));
            }
        }
        out
    }
}

/// `"x1/2"` → `(1, 2)`: a fraction below one with terms 1–16.
fn parse_fraction(s: &str) -> Option<(u32, u32)> {
    let (n, d) = s.strip_prefix('x')?.split_once('/')?;
    let (n, d): (u32, u32) = (n.parse().ok()?, d.parse().ok()?);
    ((1..=16).contains(&n) && (1..=16).contains(&d) && n < d).then_some((n, d))
}

impl Default for ViewVideo {
    fn default() -> Self {
        ViewVideo {
            format: VideoFormat::new("vp8", None),
            parameters: VideoParameters::default(),
            max_input: 16,
            motion_factor: 0.8,
            bg_color: Rgb::default(),
            keep_active_input_primary: false,
            layout: Layout::default(),
            layers: Vec::new(),
        }
    }
}

/// Output video parameters of a view.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct VideoParameters {
    /// Width and height in pixels.
    pub resolution: Resolution,
    /// Frames per second.
    pub framerate: u32,
    /// Target bitrate in kbit/s; unset derives it from resolution, frame rate and motion factor.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitrate: Option<u32>,
    /// Frames between forced keyframes.
    pub key_frame_interval: u32,
}

impl Default for VideoParameters {
    fn default() -> Self {
        VideoParameters { resolution: Resolution { width: 640, height: 480 }, framerate: 24, bitrate: None, key_frame_interval: 100 }
    }
}

/// A video size in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resolution {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

/// An RGB colour, 0–255 per channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Rgb {
    /// Red.
    pub r: u8,
    /// Green.
    pub g: u8,
    /// Blue.
    pub b: u8,
}

/// Layout of a view's video: a base template plus custom region sets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Layout {
    /// `letterbox` keeps the whole input inside its region; `crop` fills the region.
    pub fit_policy: String,
    /// OWT's region-change effect name, stored as given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub set_region_effect: Option<String>,
    /// Template selection.
    pub templates: Templates,
}

impl Default for Layout {
    fn default() -> Self {
        Layout { fit_policy: "letterbox".into(), set_region_effect: None, templates: Templates::default() }
    }
}

/// Base template name and custom region sets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Templates {
    /// `fluid` (grid growing 1→4→9→16), `lecture` (one large + small ones) or `void` (custom only).
    pub base: String,
    /// Custom region sets; a set with as many regions as a base one replaces it.
    pub custom: Vec<CustomTemplate>,
}

impl Default for Templates {
    fn default() -> Self {
        Templates { base: "fluid".into(), custom: Vec::new() }
    }
}

/// One custom layout: a list of regions, and which is primary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomTemplate {
    /// Id of the primary region (the active speaker's, when enabled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<String>,
    /// The regions, filled in order.
    pub region: Vec<Region>,
}

/// A layout region: a rectangle given in fractions of the output size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Region {
    /// Region id, unique in its layout.
    pub id: String,
    /// Only `rectangle` is supported.
    #[serde(default = "rectangle")]
    pub shape: String,
    /// Position and size.
    pub area: Area,
}

fn rectangle() -> String {
    "rectangle".into()
}

/// A rectangle in fractions of the output (0..=1 each).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Area {
    /// Left edge.
    pub left: Fraction,
    /// Top edge.
    pub top: Fraction,
    /// Width.
    pub width: Fraction,
    /// Height.
    pub height: Fraction,
}

/// A fraction written the OWT way (`"1/3"`, `"0"`, `"1"`), also accepted as a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fraction {
    /// Numerator.
    pub num: u32,
    /// Denominator (never 0).
    pub den: u32,
}

impl Fraction {
    /// The value as a float.
    pub fn value(self) -> f64 {
        f64::from(self.num) / f64::from(self.den)
    }

    /// Parses `"a/b"`, `"a"` or a decimal such as `"0.5"`.
    pub fn parse(s: &str) -> Option<Fraction> {
        let s = s.trim();
        if let Some((n, d)) = s.split_once('/') {
            let num = n.trim().parse().ok()?;
            let den: u32 = d.trim().parse().ok()?;
            (den != 0).then_some(Fraction { num, den })
        } else if let Ok(num) = s.parse::<u32>() {
            Some(Fraction { num, den: 1 })
        } else {
            Self::from_f64(s.parse().ok()?)
        }
    }

    /// Approximates a decimal in [0, 1] with denominator 10000.
    pub fn from_f64(v: f64) -> Option<Fraction> {
        if !(0.0..=1.0).contains(&v) {
            return None;
        }
        Some(Fraction { num: (v * 10000.0).round() as u32, den: 10000 })
    }
}

impl Serialize for Fraction {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}/{}", self.num, self.den))
    }
}

impl<'de> Deserialize<'de> for Fraction {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::String(s) => Fraction::parse(&s).ok_or_else(|| D::Error::custom(format!("`{s}` is not a fraction like \"1/3\""))),
            serde_json::Value::Number(n) => {
                n.as_f64().and_then(Fraction::from_f64).ok_or_else(|| D::Error::custom(format!("{n} is not between 0 and 1")))
            }
            other => Err(D::Error::custom(format!("expected a fraction string like \"1/3\", got {other}"))),
        }
    }
}

/// OWT writes `false` where a view has no audio or video; `true` means the defaults.
mod false_or {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer, T: Serialize>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(t) => t.serialize(s),
            None => s.serialize_bool(false),
        }
    }

    pub fn deserialize<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de> + Default,
    {
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::Bool(true) => Ok(Some(T::default())),
            serde_json::Value::Bool(false) | serde_json::Value::Null => Ok(None),
            // Going through Value loses the nested path; put it back into the message.
            other => serde_path_to_error::deserialize(other).map(Some).map_err(|e| {
                let path = e.path().to_string();
                serde::de::Error::custom(format!("{path}: {}", e.into_inner()))
            }),
        }
    }
}

const LAYOUT_BASES: [&str; 3] = ["fluid", "lecture", "void"];
const FIT_POLICIES: [&str; 2] = ["letterbox", "crop"];

impl Room {
    /// Builds a room from OWT's create body `options` (any subset of the room fields).
    pub fn from_options(id: String, name: String, options: serde_json::Value) -> Result<Room, RoomError> {
        let mut obj = match options {
            serde_json::Value::Null => serde_json::Map::new(),
            serde_json::Value::Object(m) => m,
            _ => return Err(RoomError::new("options", "must be an object")),
        };
        obj.remove("id");
        obj.remove("_id");
        obj.insert("name".into(), serde_json::Value::String(name));
        let mut room = Room::from_json(serde_json::Value::Object(obj))?;
        room.id = id;
        room.validate()?;
        Ok(room)
    }

    /// Returns this room with the top-level fields of `patch` overwritten (OWT's PUT),
    /// validated; the id cannot change.
    pub fn updated(&self, patch: serde_json::Value) -> Result<Room, RoomError> {
        let serde_json::Value::Object(patch) = patch else {
            return Err(RoomError::new("body", "must be a JSON object"));
        };
        let mut current = match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => return Err(RoomError::new("room", "cannot be represented as JSON")),
        };
        for (k, v) in patch {
            if k == "id" || k == "_id" {
                continue;
            }
            current.insert(k, v);
        }
        let mut room = Room::from_json(serde_json::Value::Object(current))?;
        room.id = self.id.clone();
        room.validate()?;
        Ok(room)
    }

    fn from_json(v: serde_json::Value) -> Result<Room, RoomError> {
        serde_path_to_error::deserialize(v).map_err(|e| {
            let path = e.path().to_string();
            // The root is ".", and an unknown field named "" gives an empty path.
            let field = if path == "." || path.is_empty() { "body".to_string() } else { path };
            RoomError::new(field, e.into_inner().to_string())
        })
    }

    /// The role definition named `name`.
    pub fn role(&self, name: &str) -> Option<&Role> {
        self.roles.iter().find(|r| r.role == name)
    }

    /// Checks every rule a room must satisfy, naming the first field that breaks one.
    pub fn validate(&self) -> Result<(), RoomError> {
        if self.name.trim().is_empty() {
            return Err(RoomError::new("name", "must be a non-empty string"));
        }
        if self.name.len() > 256 {
            return Err(RoomError::new("name", "must be at most 256 bytes"));
        }
        if self.participant_limit < -1 {
            return Err(RoomError::new("participantLimit", "must be -1 (unlimited) or a non-negative number"));
        }
        if self.input_limit < -1 {
            return Err(RoomError::new("inputLimit", "must be -1 (unlimited) or a non-negative number"));
        }
        for (i, role) in self.roles.iter().enumerate() {
            if role.role.trim().is_empty() {
                return Err(RoomError::new(format!("roles[{i}].role"), "must be a non-empty string"));
            }
            if self.roles.iter().take(i).any(|r| r.role == role.role) {
                return Err(RoomError::new(format!("roles[{i}].role"), format!("duplicate role `{}`", role.role)));
            }
        }
        for (i, view) in self.views.iter().enumerate() {
            self.validate_view(i, view)?;
        }
        Ok(())
    }

    fn validate_view(&self, i: usize, view: &View) -> Result<(), RoomError> {
        let at = |f: &str| format!("views[{i}].{f}");
        let label_ok =
            !view.label.is_empty() && view.label.len() <= 64 && view.label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !label_ok {
            return Err(RoomError::new(at("label"), "must be 1-64 letters, digits, '-' or '_'"));
        }
        if self.views.iter().take(i).any(|v| v.label == view.label) {
            return Err(RoomError::new(at("label"), format!("duplicate view label `{}`", view.label)));
        }
        if let Some(audio) = &view.audio {
            if !self.media_out.audio.iter().any(|f| f.codec == audio.format.codec) {
                return Err(RoomError::new(at("audio.format.codec"), format!("`{}` is not in mediaOut.audio", audio.format.codec)));
            }
            if audio.format.codec != "opus" {
                return Err(RoomError::new(at("audio.format.codec"), "mixed audio supports `opus` only"));
            }
        }
        let Some(video) = &view.video else { return Ok(()) };
        if !self.media_out.video.format.iter().any(|f| f.codec == video.format.codec) {
            return Err(RoomError::new(at("video.format.codec"), format!("`{}` is not in mediaOut.video.format", video.format.codec)));
        }
        if !["vp8", "h264"].contains(&video.format.codec.as_str()) {
            return Err(RoomError::new(at("video.format.codec"), "mixed video supports `vp8` or `h264`"));
        }
        let res = video.parameters.resolution;
        if !(16..=3840).contains(&res.width) || !(16..=2160).contains(&res.height) {
            return Err(RoomError::new(at("video.parameters.resolution"), "width must be 16-3840 and height 16-2160"));
        }
        if res.width % 2 != 0 || res.height % 2 != 0 {
            return Err(RoomError::new(at("video.parameters.resolution"), "width and height must be even"));
        }
        if !(1..=60).contains(&video.parameters.framerate) {
            return Err(RoomError::new(at("video.parameters.framerate"), "must be 1-60"));
        }
        if let Some(b) = video.parameters.bitrate
            && !(50..=50_000).contains(&b)
        {
            return Err(RoomError::new(at("video.parameters.bitrate"), "must be 50-50000 kbit/s"));
        }
        if video.parameters.key_frame_interval == 0 {
            return Err(RoomError::new(at("video.parameters.keyFrameInterval"), "must be at least 1"));
        }
        if !(1..=256).contains(&video.max_input) {
            return Err(RoomError::new(at("video.maxInput"), "must be 1-256"));
        }
        if !(video.motion_factor > 0.0 && video.motion_factor <= 10.0) {
            return Err(RoomError::new(at("video.motionFactor"), "must be above 0 and at most 10"));
        }
        if video.layers.len() > MAX_VIEW_LAYERS {
            return Err(RoomError::new(at("video.layers"), format!("at most {MAX_VIEW_LAYERS} lower layers")));
        }
        for (l, layer) in video.layers.iter().enumerate() {
            let Some((n, d)) = parse_fraction(layer) else {
                return Err(RoomError::new(at(&format!("video.layers[{l}]")), "must be a fraction below one such as `x1/2` (terms 1-16)"));
            };
            if video.layers.iter().take(l).any(|o| parse_fraction(o).is_some_and(|(n2, d2)| n2 * d == n * d2)) {
                return Err(RoomError::new(at(&format!("video.layers[{l}]")), format!("`{layer}` is the size of an earlier layer")));
            }
        }
        if let Some((_, small, _)) = video.layer_sizes().iter().find(|(_, r, _)| r.width < 16 || r.height < 16) {
            return Err(RoomError::new(at("video.layers"), format!("a layer of {}x{} is below 16 pixels a side", small.width, small.height)));
        }
        let layout = &video.layout;
        if !FIT_POLICIES.contains(&layout.fit_policy.as_str()) {
            return Err(RoomError::new(at("video.layout.fitPolicy"), "must be `letterbox` or `crop`"));
        }
        if !LAYOUT_BASES.contains(&layout.templates.base.as_str()) {
            return Err(RoomError::new(at("video.layout.templates.base"), "must be `fluid`, `lecture` or `void`"));
        }
        if layout.templates.base == "void" && layout.templates.custom.is_empty() {
            return Err(RoomError::new(at("video.layout.templates.custom"), "base `void` needs at least one custom template"));
        }
        for (t, tpl) in layout.templates.custom.iter().enumerate() {
            let at_t = |f: &str| at(&format!("video.layout.templates.custom[{t}].{f}"));
            if tpl.region.is_empty() {
                return Err(RoomError::new(at_t("region"), "must hold at least one region"));
            }
            for (r, region) in tpl.region.iter().enumerate() {
                let at_r = |f: &str| at_t(&format!("region[{r}].{f}"));
                if region.id.is_empty() || tpl.region.iter().take(r).any(|o| o.id == region.id) {
                    return Err(RoomError::new(at_r("id"), "must be non-empty and unique in the template"));
                }
                if region.shape != "rectangle" {
                    return Err(RoomError::new(at_r("shape"), "only `rectangle` is supported"));
                }
                let a = region.area;
                let fits = |start: Fraction, len: Fraction| start.value() <= 1.0 && len.value() > 0.0 && start.value() + len.value() <= 1.0 + 1e-9;
                if !fits(a.left, a.width) || !fits(a.top, a.height) {
                    return Err(RoomError::new(at_r("area"), "must lie inside the output (left+width and top+height at most 1, sizes above 0)"));
                }
            }
            if let Some(p) = &tpl.primary
                && !tpl.region.iter().any(|r| &r.id == p)
            {
                return Err(RoomError::new(at_t("primary"), format!("names no region of the template: `{p}`")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_match_owt() {
        let room = Room::from_options("r1".into(), "Meeting".into(), json!({})).unwrap();
        assert_eq!(room.participant_limit, -1);
        assert_eq!(room.views.len(), 1);
        assert_eq!(room.views[0].label, "common");
        let video = room.views[0].video.as_ref().unwrap();
        assert_eq!(video.parameters.resolution, Resolution { width: 640, height: 480 });
        assert_eq!(video.layout.templates.base, "fluid");
        assert!(room.role("presenter").unwrap().publish.video);
        assert!(!room.role("viewer").unwrap().publish.audio);
        let out = serde_json::to_value(&room).unwrap();
        assert_eq!(out["participantLimit"], -1);
        assert_eq!(out["views"][0]["audio"]["format"]["codec"], "opus");
    }

    #[test]
    fn partial_view_and_false_audio() {
        let room = Room::from_options(
            "r".into(),
            "n".into(),
            json!({"views": [{"label": "a", "audio": false, "video": {"parameters": {"framerate": 15}}}]}),
        )
        .unwrap();
        assert!(room.views[0].audio.is_none());
        let v = room.views[0].video.as_ref().unwrap();
        assert_eq!(v.parameters.framerate, 15);
        assert_eq!(v.parameters.resolution.width, 640);
        assert_eq!(serde_json::to_value(&room).unwrap()["views"][0]["audio"], json!(false));
    }

    #[test]
    fn view_layers_parse_scale_and_refuse_what_cannot_be_encoded() {
        let room = Room::from_options("r".into(), "n".into(), json!({"views": [{"video": {"layers": ["x1/2", "x1/4"]}}]})).unwrap();
        let sizes = room.views[0].video.as_ref().unwrap().layer_sizes();
        let got: Vec<(&str, u32, u32)> = sizes.iter().map(|(rid, r, _)| (rid.as_str(), r.width, r.height)).collect();
        assert_eq!(got, vec![("x1", 640, 480), ("x1_2", 320, 240), ("x1_4", 160, 120)]);
        // Odd results round down to even sizes.
        let room = Room::from_options(
            "r".into(),
            "n".into(),
            json!({"views": [{"video": {"parameters": {"resolution": {"width": 1280, "height": 720}}, "layers": ["x1/3"]}}]}),
        )
        .unwrap();
        assert_eq!(room.views[0].video.as_ref().unwrap().layer_sizes()[1].1, Resolution { width: 426, height: 240 });
        for (layers, reason) in [
            (json!(["x1/2", "x2/4"]), "earlier layer"),
            (json!(["x1"]), "fraction below one"),
            (json!(["1/2"]), "fraction below one"),
            (json!(["x1/2", "x1/3", "x1/4", "x1/5"]), "at most 3"),
            (json!(["x1/8"]), "below 16 pixels"),
        ] {
            let video = json!({"parameters": {"resolution": {"width": 96, "height": 96}}, "layers": layers});
            let e = Room::from_options("r".into(), "n".into(), json!({"views": [{"video": video}]})).unwrap_err();
            assert!(e.field.starts_with("views[0].video.layers"), "{e}");
            assert!(e.reason.contains(reason), "{layers}: {e}");
        }
    }

    #[test]
    fn errors_name_the_field() {
        let e = Room::from_options("r".into(), "n".into(), json!({"participantLimit": "many"})).unwrap_err();
        assert_eq!(e.field, "participantLimit");
        let e = Room::from_options("r".into(), "n".into(), json!({"participantLimit": -5})).unwrap_err();
        assert_eq!(e.field, "participantLimit");
        let e = Room::from_options("r".into(), "n".into(), json!({"bogus": 1})).unwrap_err();
        assert!(e.reason.contains("bogus"), "{e}");
        let e = Room::from_options("r".into(), "n".into(), json!({"views": [{}, {"video": {"framerate": 3}}]})).unwrap_err();
        assert_eq!(e.field, "views[1].video");
        assert!(e.reason.contains("framerate"), "{e}");
        let e = Room::from_options("r".into(), "n".into(), json!({"views": [{}, {}]})).unwrap_err();
        assert_eq!(e.field, "views[1].label");
        let e = Room::from_options("r".into(), "n".into(), json!({"views": [{"video": {"parameters": {"framerate": 0}}}]})).unwrap_err();
        assert_eq!(e.field, "views[0].video.parameters.framerate");
        let e = Room::from_options("r".into(), " ".into(), json!({})).unwrap_err();
        assert_eq!(e.field, "name");
    }

    #[test]
    fn custom_regions_parse_fractions() {
        let room = Room::from_options(
            "r".into(),
            "n".into(),
            json!({"views": [{"video": {"layout": {"templates": {"base": "void", "custom": [{"primary": "1", "region": [
                {"id": "1", "shape": "rectangle", "area": {"left": "0", "top": "0", "width": "1/2", "height": 1}},
                {"id": "2", "area": {"left": "1/2", "top": 0, "width": 0.5, "height": "1"}}
            ]}]}}}}]}),
        )
        .unwrap();
        let tpl = &room.views[0].video.as_ref().unwrap().layout.templates.custom[0];
        assert_eq!(tpl.region[1].area.left.value(), 0.5);
        assert_eq!(tpl.region[1].area.width.value(), 0.5);
        let bad = Room::from_options(
            "r".into(),
            "n".into(),
            json!({"views": [{"video": {"layout": {"templates": {"custom": [{"region": [
                {"id": "1", "area": {"left": "1/2", "top": "0", "width": "2/3", "height": "1"}}]}]}}}}]}),
        )
        .unwrap_err();
        assert_eq!(bad.field, "views[0].video.layout.templates.custom[0].region[0].area");
    }

    #[test]
    fn update_overwrites_top_level_fields_only() {
        let room = Room::from_options("r".into(), "n".into(), json!({})).unwrap();
        let up = room.updated(json!({"participantLimit": 3, "id": "other"})).unwrap();
        assert_eq!(up.participant_limit, 3);
        assert_eq!(up.id, "r");
        assert_eq!(up.views, room.views);
        assert!(room.updated(json!({"views": [{"label": "bad label"}]})).is_err());
    }
}

/// Property tests: building a room from any JSON never panics; an accepted room is valid
/// and survives the store's JSON round trip unchanged; fractions parse exactly.
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{Map, Value, json};

    fn config() -> ProptestConfig {
        ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() }
    }

    fn text(max: usize) -> impl Strategy<Value = String> {
        prop::collection::vec(any::<char>(), 0..max).prop_map(String::from_iter)
    }

    /// Any JSON value, nested at most 3 deep.
    fn any_json() -> BoxedStrategy<Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            text(12).prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(text(8), inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
        .boxed()
    }

    /// Mostly `typed`, sometimes any JSON at all in its place.
    fn or_junk(typed: impl Strategy<Value = Value> + 'static) -> BoxedStrategy<Value> {
        prop_oneof![40 => typed, 1 => any_json()].boxed()
    }

    /// An object with each field present or not (almost always when its name starts with
    /// `!`, for the required ones), and now and then an unknown field.
    fn object(fields: Vec<(&'static str, BoxedStrategy<Value>)>) -> BoxedStrategy<Value> {
        let present: Vec<_> = fields
            .into_iter()
            .map(|(k, s)| {
                let (k, p) = match k.strip_prefix('!') {
                    Some(k) => (k, 0.97),
                    None => (k, 0.6),
                };
                prop::option::weighted(p, s).prop_map(move |v| (k, v))
            })
            .collect();
        (present, prop::option::weighted(0.02, ("[a-zA-Z]{1,6}", any_json())))
            .prop_map(|(fields, extra)| {
                let mut m = Map::new();
                for (k, v) in fields {
                    if let Some(v) = v {
                        m.insert(k.to_string(), v);
                    }
                }
                if let Some((k, v)) = extra {
                    m.insert(k, v);
                }
                Value::Object(m)
            })
            .boxed()
    }

    fn one_of(words: &'static [&'static str]) -> BoxedStrategy<Value> {
        prop_oneof![30 => prop::sample::select(words).prop_map(Value::from), 1 => text(6).prop_map(Value::from)].boxed()
    }

    fn int(range: std::ops::Range<i64>) -> BoxedStrategy<Value> {
        or_junk(range.prop_map(Value::from))
    }

    fn boolean() -> BoxedStrategy<Value> {
        or_junk(any::<bool>().prop_map(Value::from))
    }

    fn fraction_json() -> BoxedStrategy<Value> {
        prop_oneof![
            8 => (0..3u32, 1..5u32).prop_map(|(n, d)| Value::from(format!("{n}/{d}"))),
            4 => (0.0..0.6f64).prop_map(Value::from),
            1 => prop::sample::select(&["0", "1", "0.5", " 1 / 2 ", "1/0", "-1", "NaN", "inf", "", "7/3", "1e0"][..]).prop_map(Value::from),
            1 => any_json(),
        ]
        .boxed()
    }

    fn audio_format() -> BoxedStrategy<Value> {
        object(vec![("!codec", one_of(&["opus", "opus", "pcmu", "pcma", "isac"])), ("sampleRate", int(8000..96_000)), ("channelNum", int(1..3))])
    }

    fn video_format() -> BoxedStrategy<Value> {
        object(vec![("!codec", one_of(&["vp8", "vp8", "h264", "vp9", "av1"])), ("profile", one_of(&["CB", "B", "M", "H"]))])
    }

    fn region() -> BoxedStrategy<Value> {
        // Mostly rectangles inside the output (in quarters), else anything.
        let inside = (0..4u32, 0..4u32, 1..5u32, 1..5u32).prop_map(|(l, t, w, h)| {
            let (w, h) = (w.min(4 - l), h.min(4 - t));
            json!({"left": format!("{l}/4"), "top": format!("{t}/4"), "width": format!("{w}/4"), "height": h as f64 / 4.0})
        });
        let area = prop_oneof![
            2 => inside,
            1 => object(vec![("!left", fraction_json()), ("!top", fraction_json()), ("!width", fraction_json()), ("!height", fraction_json())]),
        ]
        .boxed();
        object(vec![
            ("!id", one_of(&["1", "2", "3", "4", "5", ""])),
            ("shape", one_of(&["rectangle", "rectangle", "rectangle", "rectangle", "rectangle", "circle"])),
            ("!area", area),
        ])
    }

    fn layout() -> BoxedStrategy<Value> {
        let custom =
            object(vec![("primary", one_of(&["1", "2", "9"])), ("!region", or_junk(prop::collection::vec(region(), 1..4).prop_map(Value::Array)))]);
        let templates = object(vec![
            ("base", one_of(&["fluid", "lecture", "void", "void", "grid"])),
            ("custom", or_junk(prop::collection::vec(custom, 1..3).prop_map(Value::Array))),
        ]);
        object(vec![
            ("fitPolicy", one_of(&["letterbox", "crop", "letterbox", "crop", "letterbox", "crop", "stretch"])),
            ("setRegionEffect", one_of(&["none"])),
            ("!templates", templates),
        ])
    }

    /// A layout of custom templates that are mostly right: unique region ids, areas in
    /// quarters of the output (sometimes sticking out), a primary that may name no region.
    fn custom_layout() -> BoxedStrategy<Value> {
        let rect = (0..4u32, 0..4u32, 1..5u32, 1..5u32, prop::bool::weighted(0.9))
            .prop_map(|(l, t, w, h, fit)| if fit { (l, t, w.min(4 - l), h.min(4 - t)) } else { (l, t, w, h) });
        let template = (prop::collection::vec(rect, 1..5), prop::option::of(0..6usize)).prop_map(|(rects, primary)| {
            let region: Vec<Value> = rects
                .iter()
                .enumerate()
                .map(|(i, (l, t, w, h))| json!({"id": format!("r{i}"), "area": {"left": format!("{l}/4"), "top": format!("{t}/4"), "width": format!("{w}/4"), "height": format!("{h}/4")}}))
                .collect();
            match primary {
                Some(p) => json!({"primary": format!("r{p}"), "region": region}),
                None => json!({"region": region}),
            }
        });
        (prop::sample::select(&["fluid", "lecture", "void"][..]), prop::collection::vec(template, 0..3))
            .prop_map(|(base, custom)| json!({"templates": {"base": base, "custom": custom}}))
            .boxed()
    }

    fn view() -> BoxedStrategy<Value> {
        let resolution = object(vec![("!width", int(8..4000)), ("!height", int(8..2400))]);
        let parameters =
            object(vec![("resolution", resolution), ("framerate", int(0..65)), ("bitrate", int(0..52_000)), ("keyFrameInterval", int(0..200))]);
        let bg = object(vec![("r", int(0..260)), ("g", int(0..260)), ("b", int(0..260))]);
        let video = object(vec![
            ("format", video_format()),
            ("parameters", parameters),
            ("maxInput", int(0..270)),
            ("motionFactor", or_junk(prop_oneof![(-0.5..10.5f64), Just(0.8)].prop_map(Value::from))),
            ("bgColor", bg),
            ("keepActiveInputPrimary", boolean()),
            ("layout", layout()),
            (
                "layers",
                or_junk(prop::collection::vec(one_of(&["x1/2", "x1/4", "x3/4", "x2/4", "x1", "x0/2", "1/2", "x1/64"]), 0..5).prop_map(Value::Array)),
            ),
        ]);
        let audio = object(vec![("format", audio_format()), ("vad", boolean())]);
        object(vec![
            ("label", prop_oneof![4 => "[a-z0-9_-]{1,10}".prop_map(Value::from), 1 => one_of(&["common", "bad label", ""])].boxed()),
            ("audio", prop_oneof![Just(json!(false)), Just(json!(true)), audio].boxed()),
            ("video", prop_oneof![Just(json!(false)), Just(json!(true)), video].boxed()),
        ])
    }

    /// Room options shaped like OWT's create body, with junk mixed in at every level.
    fn room_options() -> BoxedStrategy<Value> {
        let av = || object(vec![("audio", boolean()), ("video", boolean())]);
        let role = object(vec![
            ("!role", prop_oneof![4 => "[a-z_]{1,12}".prop_map(Value::from), 1 => one_of(&["presenter", "viewer", " "])].boxed()),
            ("publish", av()),
            ("subscribe", av()),
        ]);
        let list = |s: BoxedStrategy<Value>, n: usize| or_junk(prop::collection::vec(s, 0..n).prop_map(Value::Array));
        let media_in = object(vec![("audio", list(audio_format(), 3)), ("video", list(video_format(), 3))]);
        let media_out_video = object(vec![("format", list(video_format(), 3)), ("parameters", any_json())]);
        let media_out = object(vec![("audio", list(audio_format(), 3)), ("video", media_out_video)]);
        let notifying = object(vec![("participantActivities", boolean()), ("streamChange", boolean())]);
        prop_oneof![
            1 => any_json(),
            12 => object(vec![
                ("id", any_json()),
                ("participantLimit", int(-3..100)),
                ("inputLimit", int(-3..100)),
                ("roles", list(role, 4)),
                ("views", list(view(), 3)),
                ("mediaIn", media_in),
                ("mediaOut", media_out),
                ("notifying", notifying),
                ("autoMix", boolean()),
                ("selectActiveAudio", boolean()),
                ("enableBandwidthAdaptation", boolean()),
                ("transcoding", any_json()),
                ("sip", any_json()),
            ]),
        ]
        .boxed()
    }

    /// What the store does with a room: JSON text and back.
    fn through_store(room: &Room) -> Result<Room, TestCaseError> {
        let text = serde_json::to_string(room).map_err(|e| TestCaseError::fail(format!("serialize: {e}")))?;
        serde_json::from_str(&text).map_err(|e| TestCaseError::fail(format!("deserialize {text}: {e}")))
    }

    #[test]
    fn unknown_empty_field_names_the_body() {
        // Found by proptests: the error's field was "" (serde's path of a key named "").
        let e = Room::from_options("r1".into(), "n".into(), json!({"": null})).unwrap_err();
        assert_eq!(e.field, "body");
        assert!(e.reason.contains("unknown field ``"), "{e}");
    }

    #[test]
    fn floats_survive_the_store() {
        // Found by proptests: without serde_json's `float_roundtrip`, this number came back
        // from the store's JSON text one bit off (3.0171912935715436e276), so a stored
        // room differed from the room that was saved.
        let room = Room::from_options("r1".into(), "n".into(), json!({"transcoding": {"x": 3.017191293571544e276}})).unwrap();
        assert_eq!(through_store(&room).unwrap(), room);
        let mut room = Room::from_options("r1".into(), "n".into(), json!({})).unwrap();
        room.views[0].video.as_mut().unwrap().motion_factor = 0.30000000000000004;
        assert_eq!(through_store(&room).unwrap(), room);
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn from_options_never_panics_and_accepted_rooms_round_trip(name in prop_oneof![Just("Meeting".to_string()), text(10)], options in room_options()) {
            match Room::from_options("r1".into(), name.clone(), options.clone()) {
                Ok(room) => {
                    prop_assert_eq!(&room.id, "r1");
                    prop_assert_eq!(&room.name, &name);
                    prop_assert_eq!(room.validate(), Ok(()));
                    prop_assert_eq!(&through_store(&room)?, &room);
                    let value = serde_json::to_value(&room).unwrap();
                    prop_assert_eq!(&serde_json::from_value::<Room>(value).unwrap(), &room);
                    // Updating with nothing changes nothing; with the room's own JSON neither.
                    prop_assert_eq!(&room.updated(json!({})).unwrap(), &room);
                    prop_assert_eq!(&room.updated(serde_json::to_value(&room).unwrap()).unwrap(), &room);
                }
                Err(e) => {
                    prop_assert!(!e.field.is_empty() && !e.reason.is_empty(), "unclear error {:?} for {}", e, options);
                }
            }
        }

        #[test]
        fn custom_layouts_validate_and_round_trip(layout in prop_oneof![3 => custom_layout(), 1 => layout()]) {
            let options = json!({"views": [{"label": "v", "video": {"layout": layout}}]});
            match Room::from_options("r1".into(), "n".into(), options) {
                Ok(room) => {
                    let video = room.views[0].video.as_ref().unwrap();
                    for tpl in &video.layout.templates.custom {
                        for r in &tpl.region {
                            let a = r.area;
                            prop_assert!(a.left.value() + a.width.value() <= 1.0 + 1e-9 && a.top.value() + a.height.value() <= 1.0 + 1e-9);
                            prop_assert!(a.width.value() > 0.0 && a.height.value() > 0.0);
                        }
                    }
                    prop_assert_eq!(&through_store(&room)?, &room);
                }
                Err(e) => prop_assert!(e.field.starts_with("views[0]") && !e.reason.is_empty(), "{:?}", e),
            }
        }

        #[test]
        fn updated_never_panics_and_keeps_the_id(patch in room_options()) {
            let room = Room::from_options("r1".into(), "n".into(), json!({})).unwrap();
            match room.updated(patch) {
                Ok(up) => {
                    prop_assert_eq!(&up.id, "r1");
                    prop_assert_eq!(up.validate(), Ok(()));
                    prop_assert_eq!(&through_store(&up)?, &up);
                }
                Err(e) => prop_assert!(!e.field.is_empty() && !e.reason.is_empty()),
            }
        }

        #[test]
        fn fraction_parse_never_panics(s in prop_oneof![text(12), "[0-9 ./+-eE]{0,12}"]) {
            if let Some(f) = Fraction::parse(&s) {
                prop_assert!(f.den != 0, "{:?} parsed with a zero denominator", s);
                // What we parsed is what we write back.
                let again: Fraction = serde_json::from_value(serde_json::to_value(f).unwrap()).unwrap();
                prop_assert_eq!(again, f);
            }
        }

        #[test]
        fn fraction_parse_reads_what_it_is_given(num in any::<u32>(), den in any::<u32>(), pad in "[ ]{0,2}") {
            let got = Fraction::parse(&format!("{pad}{num}{pad}/{pad}{den}{pad}"));
            prop_assert_eq!(got, (den != 0).then_some(Fraction { num, den }));
            prop_assert_eq!(Fraction::parse(&num.to_string()), Some(Fraction { num, den: 1 }));
        }

        #[test]
        fn fraction_from_decimal_is_close_and_bounded(v in prop_oneof![any::<f64>(), -0.5..1.5f64]) {
            match Fraction::from_f64(v) {
                Some(f) => {
                    prop_assert!((0.0..=1.0).contains(&v));
                    prop_assert!((f.value() - v).abs() <= 0.5 / 10000.0 + 1e-12, "{} became {:?}", v, f);
                    let from_json: Fraction = serde_json::from_value(json!(v)).unwrap();
                    prop_assert_eq!(from_json, f);
                }
                None => prop_assert!(!(0.0..=1.0).contains(&v)),
            }
        }
    }
}
