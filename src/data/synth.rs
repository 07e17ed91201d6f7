//! The embedded synthetic function-calling task: a catalogue of realistic tools with typed
//! parameters, natural-language requests from templates, BFCL-shaped ground truth and a short
//! reasoning per sample. Deterministic from a seed; written as fcgpu JSONL.
//!
//! Also the compact ChatML prompt renderer used for training on it (`render_prompt`); the
//! completion target is `fc::prompt::render_target`, the same one real data trains with.

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Map, Value};

use crate::data::{Message, Sample};

/// Kinds of parameter values. Free text (`S`, `A`) comes from generators whose held-out
/// values never occur in the training split (see [`Split`]), so a model can only get them
/// right by reading them from the request; numbers are drawn fresh for every call.
#[derive(Clone, Copy)]
enum K {
    /// Free string.
    S(Gen),
    /// String restricted to an enum (the schema lists it; shared by both splits).
    E(&'static [&'static str]),
    /// Integer in an inclusive range.
    I(i64, i64),
    /// Float in an inclusive range with two decimals at most.
    F(f64, f64),
    /// Boolean (optional flags only: set to true when mentioned).
    B,
    /// Array of 1–3 free strings.
    A(Gen),
}

/// Generators of free-text values.
#[derive(Clone, Copy)]
enum Gen {
    /// A made-up place name from syllables ("Valmora").
    Place,
    /// "First Last", both made up.
    Person,
    /// name@domain.tld, made up.
    Email,
    /// YYYY-MM-DD.
    Date,
    /// HH:MM.
    Time,
    /// 3–4 capital letters.
    Ticker,
    /// 10–16 capital letters and digits.
    Tracking,
    /// "Adjective noun", sentence case ("Quarterly review").
    Title,
    /// "verb the adjective noun" ("bring the silver lantern").
    Chore,
    /// "adjective noun" ("modern engines").
    Thing,
    /// "The Adjective Noun".
    Work,
    /// "Name Kitchen".
    Venue,
    /// One word from a pool (ingredients, dishes).
    Word(&'static [&'static str]),
}

/// Which part of every free-text pool a sample draws from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Split {
    Train,
    Heldout,
}

struct P {
    n: &'static str,
    d: &'static str,
    k: K,
    req: bool,
    /// For optional parameters: the phrase that mentions it (`{v}` is the value).
    ph: &'static str,
}

struct T {
    n: &'static str,
    d: &'static str,
    /// What the user wants, for the reasoning ("the current weather").
    want: &'static str,
    ps: &'static [P],
    /// Request templates: `{param}` for required parameters, `{opt}` for the optional phrases.
    tpl: &'static [&'static str],
}

const fn r(n: &'static str, d: &'static str, k: K) -> P {
    P { n, d, k, req: true, ph: "" }
}
const fn o(n: &'static str, d: &'static str, k: K, ph: &'static str) -> P {
    P { n, d, k, req: false, ph }
}

// Word pools. Every fifth entry (index % 5 == 0) is held out: only evaluation samples use it.
const SYLLABLES: &[&str] = &[
    "ka", "lo", "mer", "vin", "tor", "sa", "del", "ri", "an", "bel", "cor", "du", "fen", "gar", "hal", "is",
    "jo", "kel", "lan", "mor", "nes", "or", "pal", "quin", "ros", "sel", "tam", "ul", "ver", "wen", "yar",
    "zan", "bri", "cal", "dor", "el", "fi", "go", "hu", "ta",
];
const ADJECTIVES: &[&str] = &[
    "quarterly",
    "weekly",
    "annual",
    "urgent",
    "quiet",
    "golden",
    "silver",
    "blue",
    "early",
    "late",
    "final",
    "open",
    "private",
    "family",
    "summer",
    "winter",
    "spring",
    "autumn",
    "morning",
    "evening",
    "budget",
    "design",
    "sales",
    "product",
    "garden",
    "river",
    "city",
    "mountain",
    "ocean",
    "northern",
    "southern",
    "little",
    "grand",
    "modern",
    "classic",
    "lucky",
    "happy",
    "secret",
    "hidden",
    "wooden",
];
const NOUNS: &[&str] = &[
    "review", "meeting", "dinner", "party", "workshop", "plan", "report", "update", "session", "walk",
    "lesson", "trip", "concert", "festival", "market", "bridge", "harbor", "tower", "forest", "island",
    "journey", "story", "letter", "dream", "light", "road", "house", "window", "engine", "signal", "canvas",
    "lantern", "compass", "orchard", "meadow", "station", "library", "kitchen", "mirror", "ticket",
];
const VERBS: &[&str] = &[
    "bring", "check", "call", "fix", "clean", "book", "send", "pick up", "paint", "return", "water", "move",
    "sign", "print", "wash", "order", "pack", "test", "open", "close",
];
const VENUE_KINDS: &[&str] = &["Kitchen", "Grill", "Cafe", "Bistro", "House", "Diner"];
const DOMAINS: &[&str] = &["com", "org", "net", "io"];
const INGREDIENTS: &[&str] = &[
    "chicken",
    "rice",
    "tomatoes",
    "spinach",
    "mushrooms",
    "tofu",
    "garlic",
    "pasta",
    "eggs",
    "lentils",
    "beans",
    "carrots",
    "potatoes",
    "onions",
    "peppers",
    "salmon",
    "shrimp",
    "cheese",
    "basil",
    "lemons",
    "zucchini",
    "quinoa",
    "beef",
    "corn",
    "peas",
    "ginger",
    "apples",
    "oats",
    "yogurt",
    "cabbage",
];
const FOODS: &[&str] = &[
    "pizza",
    "fries",
    "salad",
    "soda",
    "burger",
    "noodles",
    "dumplings",
    "tacos",
    "curry",
    "soup",
    "sushi",
    "wings",
    "pancakes",
    "falafel",
    "ramen",
    "burrito",
    "lasagna",
    "kebab",
    "waffles",
    "nachos",
];
const CURRENCIES: &[&str] = &["USD", "EUR", "GBP", "JPY", "CHF", "CAD", "AUD", "INR"];
const UNITS: &[&str] = &["km", "miles", "kg", "pounds", "liters", "gallons", "meters", "feet"];
const LANGS: &[&str] = &["French", "Spanish", "German", "Japanese", "Italian", "Portuguese"];
const CUISINES: &[&str] = &["Italian", "Japanese", "Mexican", "Indian", "Thai", "French"];
const TEMP_UNITS: &[&str] = &["celsius", "fahrenheit"];

use Gen::*;
static TOOLS: &[T] = &[
    T {
        n: "get_weather",
        d: "Get the current weather for a city.",
        want: "the current weather",
        ps: &[
            r("city", "City name", K::S(Place)),
            o("unit", "Temperature unit", K::E(TEMP_UNITS), " in {v}"),
        ],
        tpl: &["What's the weather like in {city}{opt}?", "Tell me the current weather for {city}{opt}."],
    },
    T {
        n: "get_forecast",
        d: "Get a multi-day weather forecast for a city.",
        want: "a weather forecast",
        ps: &[
            r("city", "City name", K::S(Place)),
            r("days", "Number of days", K::I(1, 10)),
            o("include_hourly", "Include hourly details", K::B, " with hourly details"),
        ],
        tpl: &[
            "Give me a {days}-day forecast for {city}{opt}.",
            "What will the weather be in {city} over the next {days} days{opt}?",
        ],
    },
    T {
        n: "search_flights",
        d: "Search for flights between two cities on a date.",
        want: "to find flights",
        ps: &[
            r("origin", "Departure city", K::S(Place)),
            r("destination", "Arrival city", K::S(Place)),
            r("date", "Date, YYYY-MM-DD", K::S(Date)),
            o("cabin", "Cabin class", K::E(&["economy", "business", "first"]), " in {v} class"),
        ],
        tpl: &[
            "Find flights from {origin} to {destination} on {date}{opt}.",
            "I need to fly from {origin} to {destination} on {date}{opt}.",
        ],
    },
    T {
        n: "book_hotel",
        d: "Book a hotel room in a city.",
        want: "to book a hotel",
        ps: &[
            r("city", "City name", K::S(Place)),
            r("check_in", "Check-in date, YYYY-MM-DD", K::S(Date)),
            r("nights", "Number of nights", K::I(1, 14)),
            o("guests", "Number of guests", K::I(1, 6), " for {v} guests"),
        ],
        tpl: &[
            "Book a hotel in {city} from {check_in} for {nights} nights{opt}.",
            "Reserve a room in {city} checking in {check_in}, {nights} nights{opt}.",
        ],
    },
    T {
        n: "convert_currency",
        d: "Convert an amount between currencies.",
        want: "a currency conversion",
        ps: &[
            r("amount", "Amount to convert", K::F(1.0, 2000.0)),
            r("from_currency", "Source currency code", K::E(CURRENCIES)),
            r("to_currency", "Target currency code", K::E(CURRENCIES)),
        ],
        tpl: &[
            "Convert {amount} {from_currency} to {to_currency}.",
            "How much is {amount} {from_currency} in {to_currency}?",
        ],
    },
    T {
        n: "get_exchange_rate",
        d: "Get the exchange rate between two currencies.",
        want: "an exchange rate",
        ps: &[
            r("base", "Base currency code", K::E(CURRENCIES)),
            r("target", "Target currency code", K::E(CURRENCIES)),
        ],
        tpl: &["What is the exchange rate from {base} to {target}?", "Show me the {base} to {target} rate."],
    },
    T {
        n: "create_calendar_event",
        d: "Create an event in the user's calendar.",
        want: "to create a calendar event",
        ps: &[
            r("title", "Event title", K::S(Title)),
            r("date", "Date, YYYY-MM-DD", K::S(Date)),
            r("time", "Start time, HH:MM", K::S(Time)),
            o("duration_minutes", "Duration in minutes", K::I(15, 180), " for {v} minutes"),
        ],
        tpl: &[
            "Schedule {title} on {date} at {time}{opt}.",
            "Add {title} to my calendar on {date} at {time}{opt}.",
        ],
    },
    T {
        n: "send_email",
        d: "Send an email.",
        want: "to send an email",
        ps: &[
            r("to", "Recipient address", K::S(Email)),
            r("subject", "Subject line", K::S(Title)),
            r("body", "Message text", K::S(Chore)),
            o("cc", "Address to copy", K::S(Email), " and cc {v}"),
        ],
        tpl: &[
            "Send an email to {to} with subject {subject} saying {body}{opt}.",
            "Email {to} about {subject}: {body}{opt}.",
        ],
    },
    T {
        n: "get_stock_price",
        d: "Get the latest price of a stock.",
        want: "a stock price",
        ps: &[
            r("symbol", "Ticker symbol", K::S(Ticker)),
            o("exchange", "Stock exchange", K::E(&["NASDAQ", "NYSE"]), " on the {v}"),
        ],
        tpl: &["What is the current price of {symbol} stock{opt}?", "How much is {symbol} trading at{opt}?"],
    },
    T {
        n: "get_stock_history",
        d: "Get the price history of a stock.",
        want: "a stock's price history",
        ps: &[r("symbol", "Ticker symbol", K::S(Ticker)), r("days", "Number of past days", K::I(5, 365))],
        tpl: &[
            "Show me the price history of {symbol} over the last {days} days.",
            "How has {symbol} done in the past {days} days?",
        ],
    },
    T {
        n: "convert_units",
        d: "Convert a value between units.",
        want: "a unit conversion",
        ps: &[
            r("value", "Value to convert", K::F(1.0, 2000.0)),
            r("from_unit", "Source unit", K::E(UNITS)),
            r("to_unit", "Target unit", K::E(UNITS)),
        ],
        tpl: &["Convert {value} {from_unit} to {to_unit}.", "How many {to_unit} is {value} {from_unit}?"],
    },
    T {
        n: "find_recipes",
        d: "Find recipes that use given ingredients.",
        want: "recipes",
        ps: &[
            r("ingredients", "Ingredients to use", K::A(Word(INGREDIENTS))),
            o("max_minutes", "Maximum cooking time", K::I(10, 120), " that take at most {v} minutes"),
            o("vegetarian", "Vegetarian only", K::B, ", vegetarian only"),
        ],
        tpl: &["Find recipes with {ingredients}{opt}.", "What can I cook with {ingredients}{opt}?"],
    },
    T {
        n: "translate_text",
        d: "Translate text into another language.",
        want: "a translation",
        ps: &[
            r("text", "Text to translate", K::S(Chore)),
            r("target_language", "Language to translate into", K::E(LANGS)),
            o("source_language", "Language of the text", K::E(LANGS), " from {v}"),
        ],
        tpl: &[
            "Translate {text} into {target_language}{opt}.",
            "How do you say {text} in {target_language}{opt}?",
        ],
    },
    T {
        n: "set_reminder",
        d: "Set a reminder.",
        want: "a reminder",
        ps: &[
            r("message", "What to remind about", K::S(Chore)),
            r("minutes_from_now", "Delay in minutes", K::I(5, 240)),
        ],
        tpl: &[
            "Remind me to {message} in {minutes_from_now} minutes.",
            "In {minutes_from_now} minutes, remind me to {message}.",
        ],
    },
    T {
        n: "get_news",
        d: "Get the latest news on a topic.",
        want: "news",
        ps: &[
            r("topic", "News topic", K::S(Thing)),
            o("count", "Number of articles", K::I(1, 10), ", top {v} articles"),
        ],
        tpl: &["What's the latest news about {topic}{opt}?", "Show me headlines on {topic}{opt}."],
    },
    T {
        n: "calculate_tip",
        d: "Calculate the tip for a bill.",
        want: "a tip calculation",
        ps: &[
            r("bill_amount", "Bill total", K::F(1.0, 2000.0)),
            r("tip_percent", "Tip percentage", K::I(10, 25)),
            o("split", "Number of people", K::I(2, 6), " split between {v} people"),
        ],
        tpl: &[
            "Calculate a {tip_percent}% tip on a bill of {bill_amount}{opt}.",
            "What's {tip_percent} percent tip on {bill_amount}{opt}?",
        ],
    },
    T {
        n: "get_directions",
        d: "Get directions between two places.",
        want: "directions",
        ps: &[
            r("origin", "Start place", K::S(Place)),
            r("destination", "End place", K::S(Place)),
            o("mode", "Travel mode", K::E(&["driving", "walking", "transit", "cycling"]), " by {v}"),
        ],
        tpl: &[
            "How do I get from {origin} to {destination}{opt}?",
            "Directions from {origin} to {destination}{opt}, please.",
        ],
    },
    T {
        n: "find_restaurants",
        d: "Find restaurants in a city.",
        want: "restaurants",
        ps: &[
            r("city", "City name", K::S(Place)),
            r("cuisine", "Type of food", K::E(CUISINES)),
            o("max_price", "Price level 1-4", K::I(1, 4), " with price level at most {v}"),
        ],
        tpl: &[
            "Find {cuisine} restaurants in {city}{opt}.",
            "Where can I eat {cuisine} food in {city}{opt}?",
        ],
    },
    T {
        n: "play_music",
        d: "Play a song.",
        want: "to play music",
        ps: &[
            r("song", "Song title", K::S(Work)),
            o("artist", "Artist name", K::S(Person), " by {v}"),
            o("shuffle", "Shuffle the queue", K::B, " on shuffle"),
        ],
        tpl: &["Play {song}{opt}.", "Put on {song}{opt}."],
    },
    T {
        n: "get_movie_showtimes",
        d: "Get showtimes for a movie.",
        want: "movie showtimes",
        ps: &[
            r("movie", "Movie title", K::S(Work)),
            r("city", "City name", K::S(Place)),
            o("date", "Date, YYYY-MM-DD", K::S(Date), " on {v}"),
        ],
        tpl: &["When is {movie} showing in {city}{opt}?", "Showtimes for {movie} in {city}{opt}."],
    },
    T {
        n: "calculate_bmi",
        d: "Calculate body mass index.",
        want: "a BMI calculation",
        ps: &[
            r("weight_kg", "Weight in kg", K::F(40.0, 150.0)),
            r("height_m", "Height in meters", K::F(1.4, 2.1)),
        ],
        tpl: &[
            "Calculate the BMI for someone who weighs {weight_kg} kg and is {height_m} m tall.",
            "My weight is {weight_kg} kg and height {height_m} m. What's my BMI?",
        ],
    },
    T {
        n: "get_time_zone",
        d: "Get the time zone of a city.",
        want: "a time zone",
        ps: &[r("city", "City name", K::S(Place))],
        tpl: &["What time zone is {city} in?", "Which time zone does {city} use?"],
    },
    T {
        n: "order_food",
        d: "Order food from a restaurant.",
        want: "to order food",
        ps: &[
            r("restaurant", "Restaurant name", K::S(Venue)),
            r("items", "Items to order", K::A(Word(FOODS))),
            o("delivery", "Deliver instead of pickup", K::B, " for delivery"),
        ],
        tpl: &["Order {items} from {restaurant}{opt}.", "Get me {items} from {restaurant}{opt}."],
    },
    T {
        n: "track_package",
        d: "Track a package.",
        want: "to track a package",
        ps: &[
            r("tracking_number", "Tracking number", K::S(Tracking)),
            o("carrier", "Shipping carrier", K::E(&["UPS", "FedEx", "DHL", "USPS"]), " shipped with {v}"),
        ],
        tpl: &["Where is my package {tracking_number}{opt}?", "Track package {tracking_number}{opt}."],
    },
    T {
        n: "get_population",
        d: "Get the population of a country.",
        want: "population data",
        ps: &[r("country", "Country name", K::S(Place)), o("year", "Year", K::I(1990, 2023), " in {v}")],
        tpl: &["What was the population of {country}{opt}?", "How many people live in {country}{opt}?"],
    },
    T {
        n: "search_products",
        d: "Search the online store.",
        want: "to search for products",
        ps: &[
            r("query", "Search terms", K::S(Thing)),
            o("max_price", "Maximum price", K::F(5.0, 500.0), " under {v} dollars"),
            o("in_stock", "Only items in stock", K::B, " that are in stock"),
        ],
        tpl: &["Search the store for {query}{opt}.", "I'm looking for {query}{opt}."],
    },
];

const OFF_TOPIC: &[&str] = &[
    "Tell me a joke about penguins.",
    "Write a haiku about autumn.",
    "Who won the 1998 World Cup?",
    "Explain how photosynthesis works.",
    "What is the meaning of life?",
    "Summarize the plot of Hamlet.",
    "How do I fix a leaking faucet?",
    "Recommend a good book about history.",
    "What is the square root of 144?",
    "Why is the sky blue?",
    "Give me tips for a job interview.",
    "Who painted the Mona Lisa?",
];

fn kind_type(k: K) -> &'static str {
    match k {
        K::S(_) | K::E(_) => "string",
        K::I(..) => "integer",
        K::F(..) => "float",
        K::B => "boolean",
        K::A(_) => "array",
    }
}

/// BFCL function doc of tool `t`.
fn tool_doc(t: &T) -> Value {
    let mut props = Map::new();
    for p in t.ps {
        let mut v = json!({"type": kind_type(p.k), "description": p.d});
        match p.k {
            K::E(vals) => {
                v["enum"] = json!(vals);
            }
            K::A(_) => {
                v["items"] = json!({"type": "string"});
            }
            _ => {}
        }
        props.insert(p.n.into(), v);
    }
    let req: Vec<&str> = t.ps.iter().filter(|p| p.req).map(|p| p.n).collect();
    json!({"name": t.n, "description": t.d, "parameters": {"type": "dict", "properties": props, "required": req}})
}

/// An entry of `pool` from `split`'s part.
fn pick(pool: &'static [&'static str], split: Split, rng: &mut ChaCha8Rng) -> &'static str {
    let part: Vec<&str> =
        pool.iter().enumerate().filter(|(i, _)| in_split(*i, split)).map(|(_, w)| *w).collect();
    part.choose(rng).unwrap()
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    c.next().map(|f| f.to_uppercase().chain(c).collect()).unwrap_or_default()
}

/// Whether entry `i` of a pool belongs to `split`: every fifth entry is held out.
fn in_split(i: usize, split: Split) -> bool {
    (i % 5 == 0) == (split == Split::Heldout)
}

/// `n` draws from `alphabet`; a training string uses only the training part of the alphabet,
/// a held-out one has at least one held-out entry, so the two never meet whatever the seeds.
fn compose<T: Copy>(alphabet: &[T], n: usize, split: Split, rng: &mut ChaCha8Rng) -> Vec<T> {
    let part = |s: Split| -> Vec<T> {
        alphabet.iter().enumerate().filter(|(i, _)| in_split(*i, s)).map(|(_, x)| *x).collect()
    };
    match split {
        Split::Train => {
            let train = part(Split::Train);
            (0..n).map(|_| *train.choose(rng).unwrap()).collect()
        }
        Split::Heldout => {
            let mut out: Vec<T> = (0..n).map(|_| *alphabet.choose(rng).unwrap()).collect();
            let at = rng.random_range(0..n);
            out[at] = *part(Split::Heldout).choose(rng).unwrap();
            out
        }
    }
}

/// A made-up name of 2–3 syllables ("Valmora").
fn made_up_name(split: Split, rng: &mut ChaCha8Rng) -> String {
    let n = rng.random_range(2..=3usize);
    capitalize(&compose(SYLLABLES, n, split, rng).concat())
}

fn random_chars(alphabet: &[u8], n: usize, split: Split, rng: &mut ChaCha8Rng) -> String {
    compose(alphabet, n, split, rng).into_iter().map(char::from).collect()
}

/// A number in `lo..=hi` whose held-out status (`x % 5 == 0`) matches `split`.
fn split_number(lo: u32, hi: u32, split: Split, rng: &mut ChaCha8Rng) -> u32 {
    let xs: Vec<u32> = (lo..=hi).filter(|x| in_split(*x as usize, split)).collect();
    *xs.choose(rng).unwrap()
}

fn gen(g: Gen, split: Split, rng: &mut ChaCha8Rng) -> String {
    const UPPER: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ";
    const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    match g {
        Place => made_up_name(split, rng),
        Person => format!("{} {}", made_up_name(split, rng), made_up_name(split, rng)),
        Email => {
            let (user, host) = (made_up_name(split, rng), made_up_name(split, rng));
            format!("{}@{}.{}", user.to_lowercase(), host.to_lowercase(), DOMAINS.choose(rng).unwrap())
        }
        // Held-out dates fall on days 5, 10, 15, 20 and 25; held-out times at :05, :25, :45.
        Date => format!(
            "{}-{:02}-{:02}",
            rng.random_range(2024..=2027),
            rng.random_range(1..=12),
            split_number(1, 28, split, rng)
        ),
        Time => format!("{:02}:{:02}", rng.random_range(6..=21), 5 * split_number(0, 11, split, rng)),
        Ticker => {
            let n = rng.random_range(3..=4);
            random_chars(UPPER, n, split, rng)
        }
        Tracking => {
            let n = rng.random_range(10..=16);
            random_chars(ALNUM, n, split, rng)
        }
        Title => capitalize(&format!("{} {}", pick(ADJECTIVES, split, rng), pick(NOUNS, split, rng))),
        Chore => format!(
            "{} the {} {}",
            pick(VERBS, split, rng),
            pick(ADJECTIVES, split, rng),
            pick(NOUNS, split, rng)
        ),
        Thing => format!("{} {}s", pick(ADJECTIVES, split, rng), pick(NOUNS, split, rng)),
        Work => format!(
            "The {} {}",
            capitalize(pick(ADJECTIVES, split, rng)),
            capitalize(pick(NOUNS, split, rng))
        ),
        Venue => format!("{} {}", made_up_name(split, rng), VENUE_KINDS.choose(rng).unwrap()),
        Word(pool) => pick(pool, split, rng).to_string(),
    }
}

fn draw(k: K, split: Split, rng: &mut ChaCha8Rng) -> Value {
    match k {
        K::S(g) => json!(gen(g, split, rng)),
        K::E(pool) => json!(pool.choose(rng).unwrap()),
        K::I(lo, hi) => json!(rng.random_range(lo..=hi)),
        K::F(lo, hi) => {
            // Two decimals at most; a whole number keeps its `.0` so it stays a float.
            let cents = rng.random_range((lo * 100.0) as i64..=(hi * 100.0) as i64);
            let step = if rng.random_bool(0.5) { 50 } else { 1 };
            json!((cents / step * step) as f64 / 100.0)
        }
        K::B => json!(true),
        K::A(g) => {
            let n = rng.random_range(1..=3usize);
            let mut items: Vec<String> = Vec::new();
            while items.len() < n {
                let v = gen(g, split, rng);
                if !items.contains(&v) {
                    items.push(v);
                }
            }
            json!(items)
        }
    }
}

/// How a value reads in a request.
fn nl(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(a) => {
            let s: Vec<String> = a.iter().map(nl).collect();
            match s.len() {
                0 => String::new(),
                1 => s[0].clone(),
                n => format!("{} and {}", s[..n - 1].join(", "), s[n - 1]),
            }
        }
        other => other.to_string(),
    }
}

/// A value in Python call syntax (single-quoted strings, True/False/None).
pub fn py(v: &Value) -> String {
    match v {
        Value::String(s) => format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'")),
        Value::Bool(b) => {
            if *b {
                "True".into()
            } else {
                "False".into()
            }
        }
        Value::Null => "None".into(),
        Value::Number(n) => n.to_string(),
        Value::Array(a) => format!("[{}]", a.iter().map(py).collect::<Vec<_>>().join(", ")),
        Value::Object(o) => format!(
            "{{{}}}",
            o.iter().map(|(k, v)| format!("'{k}': {}", py(v))).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// One drawn call: the request sentence, the ground-truth entry and the parameters it sets.
struct Drawn {
    request: String,
    gt: Value,
    /// Names of the parameters the call sets (required, then the mentioned optional ones).
    set: Vec<&'static str>,
}

impl Drawn {
    /// "get_weather(city, unit)": which function and which arguments, without the values; the
    /// values come from the request, so the reasoning never gives them away.
    fn plan(&self, t: &T) -> String {
        format!("{}({})", t.n, self.set.join(", "))
    }
}

fn draw_call(t: &T, split: Split, rng: &mut ChaCha8Rng) -> Drawn {
    let mut text = t.tpl.choose(rng).unwrap().to_string();
    let mut opt = String::new();
    let mut gt = Map::new();
    let mut set = Vec::new();
    let mut used: Vec<Value> = Vec::new();
    for p in t.ps {
        // Distinct values for parameters drawn from the same pool (origin != destination).
        let mut v = draw(p.k, split, rng);
        for _ in 0..8 {
            if !used.contains(&v) {
                break;
            }
            v = draw(p.k, split, rng);
        }
        used.push(v.clone());
        if p.req {
            text = text.replace(&format!("{{{}}}", p.n), &nl(&v));
            set.push(p.n);
            gt.insert(p.n.into(), json!([v]));
        } else if rng.random_bool(0.4) {
            opt.push_str(&p.ph.replace("{v}", &nl(&v)));
            set.push(p.n);
            gt.insert(p.n.into(), json!([v]));
        } else {
            gt.insert(p.n.into(), json!([""]));
        }
    }
    Drawn { request: text.replace("{opt}", &opt), gt: json!({t.n: gt}), set }
}

/// Categories and their shares of the task.
const CATEGORIES: &[(&str, f64)] = &[
    ("simple", 0.3),
    ("multiple", 0.25),
    ("parallel", 0.15),
    ("parallel_multiple", 0.15),
    ("irrelevance", 0.15),
];

/// The category names of the embedded task, in a fixed order.
pub fn categories() -> impl Iterator<Item = &'static str> {
    CATEGORIES.iter().map(|(c, _)| *c)
}

fn pick_category(rng: &mut ChaCha8Rng) -> &'static str {
    let mut x: f64 = rng.random();
    for (c, p) in CATEGORIES {
        if x < *p {
            return c;
        }
        x -= p;
    }
    "simple"
}

/// Offered tools, expected calls, the request and the reasoning of one sample.
type Drawing = (Vec<usize>, Vec<Drawn>, String, String);

fn draw_calls(cat: &str, split: Split, rng: &mut ChaCha8Rng) -> Drawing {
    let idx: Vec<usize> = (0..TOOLS.len()).collect();
    let join = |ds: &[Drawn]| ds.iter().map(|d| d.request.as_str()).collect::<Vec<_>>().join(" Also: ");
    match cat {
        "simple" | "multiple" => {
            let n = if cat == "simple" { 1 } else { rng.random_range(2..=4usize) };
            let offered: Vec<usize> = idx.choose_multiple(rng, n).copied().collect();
            let t = *offered.choose(rng).unwrap();
            let d = draw_call(&TOOLS[t], split, rng);
            let of = if n > 1 { format!("Of the {n} functions, ") } else { String::new() };
            let reasoning = format!("The user wants {}. {of}{} fits.", TOOLS[t].want, d.plan(&TOOLS[t]));
            let request = d.request.clone();
            (offered, vec![d], request, reasoning)
        }
        "parallel" => {
            let t = *idx.choose(rng).unwrap();
            let n = rng.random_range(2..=3usize);
            let ds: Vec<Drawn> = (0..n).map(|_| draw_call(&TOOLS[t], split, rng)).collect();
            let plans = ds.iter().map(|d| d.plan(&TOOLS[t])).collect::<Vec<_>>().join(", ");
            let reasoning =
                format!("The user makes {n} requests for {}, one call each: {plans}.", TOOLS[t].want);
            {
                let request = join(&ds);
                (vec![t], ds, request, reasoning)
            }
        }
        "parallel_multiple" => {
            let n = rng.random_range(2..=3usize);
            let extra = rng.random_range(0..=1usize);
            let offered: Vec<usize> = idx.choose_multiple(rng, n + extra).copied().collect();
            let mut chosen: Vec<usize> = offered.clone();
            chosen.shuffle(rng);
            chosen.truncate(n);
            let ds: Vec<Drawn> = chosen.iter().map(|&t| draw_call(&TOOLS[t], split, rng)).collect();
            let wants = chosen.iter().map(|&t| TOOLS[t].want).collect::<Vec<_>>().join(", ");
            let plans =
                ds.iter().zip(&chosen).map(|(d, &t)| d.plan(&TOOLS[t])).collect::<Vec<_>>().join(", ");
            let reasoning = format!("The user makes {n} requests: {wants}. Calls: {plans}.");
            {
                let request = join(&ds);
                (offered, ds, request, reasoning)
            }
        }
        _ => draw_irrelevant(split, rng),
    }
}

fn draw_irrelevant(split: Split, rng: &mut ChaCha8Rng) -> Drawing {
    let idx: Vec<usize> = (0..TOOLS.len()).collect();
    let n = rng.random_range(1..=3usize);
    let names = |offered: &[usize]| offered.iter().map(|&i| TOOLS[i].n).collect::<Vec<_>>().join(", ");
    if rng.random_bool(0.5) {
        // A request for a tool that is not offered.
        let t = *idx.choose(rng).unwrap();
        let others: Vec<usize> =
            idx.iter().copied().filter(|&i| i != t && TOOLS[i].want != TOOLS[t].want).collect();
        let offered: Vec<usize> = others.choose_multiple(rng, n).copied().collect();
        let d = draw_call(&TOOLS[t], split, rng);
        let reasoning = format!(
            "The user wants {}, but no available function ({}) provides that. No call.",
            TOOLS[t].want,
            names(&offered)
        );
        (offered, vec![], d.request, reasoning)
    } else {
        let offered: Vec<usize> = idx.choose_multiple(rng, n).copied().collect();
        let q = OFF_TOPIC.choose(rng).unwrap().to_string();
        let reasoning =
            format!("The user asks something none of the functions ({}) can do. No call.", names(&offered));
        (offered, vec![], q, reasoning)
    }
}

/// One sample of `category` (drawn when `None`), with free-text values from `split`.
pub fn sample(id: String, category: Option<&str>, split: Split, rng: &mut ChaCha8Rng) -> Sample {
    let cat = category.and_then(|c| categories().find(|n| *n == c)).unwrap_or_else(|| pick_category(rng));
    let (tools, calls, request, reasoning) = draw_calls(cat, split, rng);
    Sample {
        id,
        category: cat.to_string(),
        messages: vec![Message { role: "user".into(), content: request }],
        functions: tools.iter().map(|&t| tool_doc(&TOOLS[t])).collect(),
        ground_truth: calls.into_iter().map(|d| d.gt).collect(),
        reasoning: Some(reasoning),
    }
}

/// Every free-text value a sample's calls expect (strings, and the items of string arrays);
/// numbers, booleans and enum values are left out.
pub fn free_text_values(s: &Sample) -> Vec<String> {
    let mut out = Vec::new();
    for call in &s.ground_truth {
        let Some((name, params)) = call.as_object().and_then(|o| o.iter().next()) else {
            continue;
        };
        let Some(doc) = s.functions.iter().find(|f| f["name"] == name.as_str()) else {
            continue;
        };
        for (p, allowed) in params.as_object().into_iter().flatten() {
            if doc["parameters"]["properties"][p].get("enum").is_some() {
                continue;
            }
            let v = &allowed[0];
            let items = v.as_array().cloned().unwrap_or_else(|| vec![v.clone()]);
            out.extend(items.iter().filter_map(|x| x.as_str()).filter(|x| !x.is_empty()).map(str::to_string));
        }
    }
    out
}

/// The task: `n_train` training samples and `n_eval` held-out ones. Held-out samples draw
/// free text from the held-out part of every word pool, and any held-out sample with a
/// free-text value that also occurs in training (a made-up name drawn twice) is redrawn, so
/// no held-out argument value (enums aside) was ever seen in training.
pub fn generate(seed: u64, n_train: usize, n_eval: usize) -> (Vec<Sample>, Vec<Sample>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let train: Vec<Sample> =
        (0..n_train).map(|i| sample(format!("synth_train_{i}"), None, Split::Train, &mut rng)).collect();
    let seen: HashSet<String> = train.iter().flat_map(free_text_values).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_e7a1);
    let mut eval = Vec::with_capacity(n_eval);
    let mut tries = 0;
    while eval.len() < n_eval && tries < n_eval * 50 {
        tries += 1;
        let s = sample(format!("synth_eval_{}", eval.len()), None, Split::Heldout, &mut rng);
        if free_text_values(&s).iter().all(|v| !seen.contains(v)) {
            eval.push(s);
        }
    }
    (train, eval)
}

pub fn write_jsonl(path: &Path, samples: &[Sample]) -> Result<()> {
    // Built in memory and written atomically: a kill or a full disk mid-write must not leave a
    // truncated task file that every later run would trip over.
    let mut text = Vec::new();
    for s in samples {
        let line = json!({"id": s.id, "category": s.category, "messages": s.messages, "tools": s.functions,
            "ground_truth": s.ground_truth, "reasoning": s.reasoning});
        serde_json::to_writer(&mut text, &line)
            .with_context(|| format!("{}: cannot serialize sample {}", path.display(), s.id))?;
        text.write_all(b"\n")?;
    }
    crate::runfs::write_atomic(path, &text)
}

/// The instruction appended to the tool list in the system prompt.
pub const SYSTEM_INSTRUCTION: &str = "Think step by step inside <think></think>, then answer with only the list of calls, e.g. [f(a=1, b='x')]. If no function fits, say so in plain text.";

/// Compact ChatML prompt: system (one signature line per tool + instruction), the
/// conversation, then the open assistant turn. The completion follows directly.
pub fn render_prompt(messages: &[Message], tools: &[Value]) -> String {
    let mut sys = String::from("You can call these functions:\n");
    for t in tools {
        sys.push_str(&signature(t));
        sys.push('\n');
    }
    sys.push_str(SYSTEM_INSTRUCTION);
    let mut out = String::new();
    let mut rest = messages;
    if let Some(first) = messages.first().filter(|m| m.role == "system") {
        sys = format!("{}\n\n{sys}", first.content);
        rest = &messages[1..];
    }
    out.push_str(&format!("<|im_start|>system\n{sys}<|im_end|>\n"));
    for m in rest {
        out.push_str(&format!("<|im_start|>{}\n{}<|im_end|>\n", m.role, m.content));
    }
    out.push_str("<|im_start|>assistant\n");
    out
}

/// A BFCL function doc as one Python-like line: `- name(a: str, b: "x"|"y" = None): what it
/// does.` Optional parameters default to None; enums list their values. Parameter
/// descriptions are left out: a third of the tokens of the JSON form.
pub fn signature(doc: &Value) -> String {
    let name = doc["name"].as_str().unwrap_or("?");
    let params = &doc["parameters"];
    let required: Vec<&str> =
        params["required"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    let args: Vec<String> = params["properties"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(p, schema)| {
            let default = if required.contains(&p.as_str()) { "" } else { " = None" };
            format!("{p}: {}{default}", type_name(schema))
        })
        .collect();
    let what = doc["description"].as_str().unwrap_or("");
    format!("- {name}({}): {what}", args.join(", "))
}

fn type_name(schema: &Value) -> String {
    if let Some(vals) = schema["enum"].as_array() {
        return vals.iter().map(|v| v.to_string()).collect::<Vec<_>>().join("|");
    }
    match schema["type"].as_str().unwrap_or("any") {
        "string" => "str".into(),
        "integer" => "int".into(),
        "float" | "number" => "float".into(),
        "boolean" => "bool".into(),
        "array" | "tuple" => format!("list[{}]", type_name(&schema["items"])),
        "dict" | "object" => "dict".into(),
        other => other.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_well_formed() {
        let (a, ea) = generate(7, 200, 30);
        let (b, eb) = generate(7, 200, 30);
        assert_eq!(a, b);
        assert_eq!(ea, eb);
        assert_eq!(ea.len(), 30);
        let cats: HashSet<&str> = a.iter().map(|s| s.category.as_str()).collect();
        assert_eq!(cats.len(), 5, "{cats:?}");
        for s in &a {
            let names: Vec<&str> = s.functions.iter().map(|t| t["name"].as_str().unwrap()).collect();
            for g in &s.ground_truth {
                let (f, params) = g.as_object().unwrap().iter().next().unwrap();
                assert!(names.contains(&f.as_str()), "{}: call {f} not offered", s.id);
                let tool = s.functions.iter().find(|t| t["name"] == json!(f)).unwrap();
                for req in tool["parameters"]["required"].as_array().unwrap() {
                    assert!(params[req.as_str().unwrap()].as_array().unwrap()[0] != json!(""));
                }
            }
            assert_eq!(s.category == "irrelevance", s.ground_truth.is_empty());
            match s.category.as_str() {
                "simple" => assert_eq!((s.functions.len(), s.ground_truth.len()), (1, 1)),
                "parallel" => assert!(s.functions.len() == 1 && s.ground_truth.len() >= 2),
                "parallel_multiple" => assert!(s.ground_truth.len() >= 2),
                _ => {}
            }
        }
    }

    #[test]
    fn heldout_values_never_occur_in_training() {
        let (train, eval) = generate(5, 2000, 200);
        let seen: HashSet<String> = train.iter().flat_map(free_text_values).collect();
        let held: Vec<String> = eval.iter().flat_map(free_text_values).collect();
        assert!(held.len() > 150, "{} held-out free-text values", held.len());
        for v in &held {
            assert!(!seen.contains(v), "held-out value {v:?} occurs in training");
        }
        // Training values are diverse enough that remembering them does not pay.
        let train_vals: Vec<String> = train.iter().flat_map(free_text_values).collect();
        let distinct: HashSet<&String> = train_vals.iter().collect();
        assert!(
            distinct.len() * 10 > train_vals.len() * 7,
            "{} distinct of {}",
            distinct.len(),
            train_vals.len()
        );
    }

    #[test]
    fn values_are_in_the_request_and_not_in_the_reasoning() {
        let (train, eval) = generate(9, 300, 50);
        for s in train.iter().chain(&eval) {
            for v in free_text_values(s) {
                assert!(
                    s.messages[0].content.contains(&v),
                    "{}: {v:?} not in {:?}",
                    s.id,
                    s.messages[0].content
                );
                assert!(
                    !contains_word(s.reasoning.as_deref().unwrap_or(""), &v),
                    "{}: the reasoning gives away {v:?}",
                    s.id
                );
            }
        }
    }

    /// `needle` occurs in `hay` with no letter or digit right before or after it.
    fn contains_word(hay: &str, needle: &str) -> bool {
        hay.match_indices(needle).any(|(i, _)| {
            let before = hay[..i].chars().next_back().is_some_and(char::is_alphanumeric);
            let after = hay[i + needle.len()..].chars().next().is_some_and(char::is_alphanumeric);
            !before && !after
        })
    }

    #[test]
    fn signature_lines() {
        let doc = tool_doc(&TOOLS[0]);
        assert_eq!(signature(&doc), "- get_weather(city: str, unit: \"celsius\"|\"fahrenheit\" = None): Get the current weather for a city.");
        let recipes = TOOLS.iter().find(|t| t.n == "find_recipes").map(tool_doc).unwrap();
        assert!(
            signature(&recipes).contains("ingredients: list[str], max_minutes: int = None"),
            "{}",
            signature(&recipes)
        );
    }

    #[test]
    fn python_literals() {
        assert_eq!(py(&json!(2.5)), "2.5");
        assert_eq!(py(&json!(100.0)), "100.0");
        assert_eq!(py(&json!("it's")), "'it\\'s'");
    }
}
