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

/// Kinds of parameter values, each with the pool its values are drawn from.
#[derive(Clone, Copy)]
enum K {
    /// Free string.
    S(&'static [&'static str]),
    /// String restricted to an enum (the schema lists it).
    E(&'static [&'static str]),
    /// Integer in an inclusive range.
    I(i64, i64),
    /// Float.
    F(&'static [f64]),
    /// Boolean (optional flags only: set to true when mentioned).
    B,
    /// Array of 1–3 strings.
    A(&'static [&'static str]),
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

const CITIES: &[&str] = &["Paris", "Tokyo", "London", "New York", "Berlin", "Madrid", "Rome", "Sydney", "Toronto", "Cairo", "Mumbai", "Seoul", "Lisbon", "Oslo", "Nairobi", "Lima", "Chicago", "Vienna"];
const DATES: &[&str] = &["2024-03-15", "2024-04-02", "2024-05-20", "2024-06-11", "2024-07-04", "2024-08-19", "2024-09-30", "2024-10-12", "2024-11-25", "2024-12-08"];
const CURRENCIES: &[&str] = &["USD", "EUR", "GBP", "JPY", "CHF", "CAD", "AUD", "INR"];
const AMOUNTS: &[f64] = &[10.0, 25.5, 50.0, 99.99, 120.0, 250.0, 500.0, 1000.0, 75.25, 15.0];
const SYMBOLS: &[&str] = &["AAPL", "MSFT", "GOOGL", "AMZN", "TSLA", "NVDA", "META", "IBM"];
const UNITS: &[&str] = &["km", "miles", "kg", "pounds", "liters", "gallons", "meters", "feet"];
const LANGS: &[&str] = &["French", "Spanish", "German", "Japanese", "Italian", "Portuguese"];
const PHRASES: &[&str] = &["Good morning", "Where is the train station", "Thank you very much", "How much does this cost", "I would like a coffee", "See you tomorrow"];
const INGREDIENTS: &[&str] = &["chicken", "rice", "tomatoes", "spinach", "mushrooms", "tofu", "garlic", "pasta", "eggs", "lentils"];
const EMAILS: &[&str] = &["alice@example.com", "bob@example.com", "carol@example.org", "dan@work.com", "team@company.com"];
const SUBJECTS: &[&str] = &["Meeting notes", "Quarterly report", "Lunch plans", "Project update", "Invoice"];
const BODIES: &[&str] = &["See you at noon", "The report is attached", "Can we move it to Friday", "Thanks for your help", "Please review by Monday"];
const TITLES: &[&str] = &["Team standup", "Dentist appointment", "Project review", "Lunch with Sam", "Budget meeting", "Yoga class"];
const TIMES: &[&str] = &["09:00", "10:30", "12:00", "14:15", "16:00", "18:45"];
const PLACES: &[&str] = &["Central Station", "the airport", "City Hall", "the museum", "Union Square", "the harbor"];
const CUISINES: &[&str] = &["Italian", "Japanese", "Mexican", "Indian", "Thai", "French"];
const SONGS: &[&str] = &["Bohemian Rhapsody", "Imagine", "Hey Jude", "Hotel California", "Yesterday", "Wonderwall"];
const ARTISTS: &[&str] = &["Queen", "John Lennon", "The Beatles", "Eagles", "Oasis"];
const MOVIES: &[&str] = &["Inception", "The Matrix", "Interstellar", "Dune", "Up", "Arrival"];
const TOPICS: &[&str] = &["climate change", "electric cars", "space exploration", "the stock market", "football", "artificial intelligence"];
const TASKS: &[&str] = &["call mom", "water the plants", "take out the trash", "buy milk", "stretch", "check the oven"];
const TRACKING: &[&str] = &["1Z999AA10123456784", "9400110898825022579493", "JD014600006281234567", "7489234567"];
const COUNTRIES: &[&str] = &["Brazil", "Japan", "Germany", "Kenya", "Canada", "India", "Mexico", "Norway"];
const PRODUCTS: &[&str] = &["wireless headphones", "running shoes", "a coffee grinder", "a desk lamp", "a backpack", "a phone case"];
const RESTAURANTS: &[&str] = &["Pizza Palace", "Sushi Go", "Taco Town", "Curry House", "Burger Barn"];
const FOODS: &[&str] = &["pizza", "fries", "salad", "soda", "burger", "noodles", "dumplings"];
const WEIGHTS: &[f64] = &[55.0, 62.5, 70.0, 81.2, 95.0, 68.4];
const HEIGHTS: &[f64] = &[1.6, 1.65, 1.72, 1.8, 1.85, 1.9];
const PRICES: &[f64] = &[20.0, 50.0, 100.0, 150.0, 300.0];
const TEMP_UNITS: &[&str] = &["celsius", "fahrenheit"];

static TOOLS: &[T] = &[
    T { n: "get_weather", d: "Get the current weather for a city.", want: "the current weather",
        ps: &[r("city", "City name", K::S(CITIES)), o("unit", "Temperature unit", K::E(TEMP_UNITS), " in {v}")],
        tpl: &["What's the weather like in {city}{opt}?", "Tell me the current weather for {city}{opt}."] },
    T { n: "get_forecast", d: "Get a multi-day weather forecast for a city.", want: "a weather forecast",
        ps: &[r("city", "City name", K::S(CITIES)), r("days", "Number of days", K::I(1, 10)), o("include_hourly", "Include hourly details", K::B, " with hourly details")],
        tpl: &["Give me a {days}-day forecast for {city}{opt}.", "What will the weather be in {city} over the next {days} days{opt}?"] },
    T { n: "search_flights", d: "Search for flights between two cities on a date.", want: "to find flights",
        ps: &[r("origin", "Departure city", K::S(CITIES)), r("destination", "Arrival city", K::S(CITIES)), r("date", "Date, YYYY-MM-DD", K::S(DATES)), o("cabin", "Cabin class", K::E(&["economy", "business", "first"]), " in {v} class")],
        tpl: &["Find flights from {origin} to {destination} on {date}{opt}.", "I need to fly from {origin} to {destination} on {date}{opt}."] },
    T { n: "book_hotel", d: "Book a hotel room in a city.", want: "to book a hotel",
        ps: &[r("city", "City name", K::S(CITIES)), r("check_in", "Check-in date, YYYY-MM-DD", K::S(DATES)), r("nights", "Number of nights", K::I(1, 14)), o("guests", "Number of guests", K::I(1, 6), " for {v} guests")],
        tpl: &["Book a hotel in {city} from {check_in} for {nights} nights{opt}.", "Reserve a room in {city} checking in {check_in}, {nights} nights{opt}."] },
    T { n: "convert_currency", d: "Convert an amount between currencies.", want: "a currency conversion",
        ps: &[r("amount", "Amount to convert", K::F(AMOUNTS)), r("from_currency", "Source currency code", K::E(CURRENCIES)), r("to_currency", "Target currency code", K::E(CURRENCIES))],
        tpl: &["Convert {amount} {from_currency} to {to_currency}.", "How much is {amount} {from_currency} in {to_currency}?"] },
    T { n: "get_exchange_rate", d: "Get the exchange rate between two currencies.", want: "an exchange rate",
        ps: &[r("base", "Base currency code", K::E(CURRENCIES)), r("target", "Target currency code", K::E(CURRENCIES))],
        tpl: &["What is the exchange rate from {base} to {target}?", "Show me the {base} to {target} rate."] },
    T { n: "create_calendar_event", d: "Create an event in the user's calendar.", want: "to create a calendar event",
        ps: &[r("title", "Event title", K::S(TITLES)), r("date", "Date, YYYY-MM-DD", K::S(DATES)), r("time", "Start time, HH:MM", K::S(TIMES)), o("duration_minutes", "Duration in minutes", K::I(15, 180), " for {v} minutes")],
        tpl: &["Schedule {title} on {date} at {time}{opt}.", "Add {title} to my calendar on {date} at {time}{opt}."] },
    T { n: "send_email", d: "Send an email.", want: "to send an email",
        ps: &[r("to", "Recipient address", K::S(EMAILS)), r("subject", "Subject line", K::S(SUBJECTS)), r("body", "Message text", K::S(BODIES)), o("cc", "Address to copy", K::S(EMAILS), " and cc {v}")],
        tpl: &["Send an email to {to} with subject {subject} saying {body}{opt}.", "Email {to} about {subject}: {body}{opt}."] },
    T { n: "get_stock_price", d: "Get the latest price of a stock.", want: "a stock price",
        ps: &[r("symbol", "Ticker symbol", K::S(SYMBOLS)), o("exchange", "Stock exchange", K::E(&["NASDAQ", "NYSE"]), " on the {v}")],
        tpl: &["What is the current price of {symbol} stock{opt}?", "How much is {symbol} trading at{opt}?"] },
    T { n: "get_stock_history", d: "Get the price history of a stock.", want: "a stock's price history",
        ps: &[r("symbol", "Ticker symbol", K::S(SYMBOLS)), r("days", "Number of past days", K::I(5, 365))],
        tpl: &["Show me the price history of {symbol} over the last {days} days.", "How has {symbol} done in the past {days} days?"] },
    T { n: "convert_units", d: "Convert a value between units.", want: "a unit conversion",
        ps: &[r("value", "Value to convert", K::F(AMOUNTS)), r("from_unit", "Source unit", K::E(UNITS)), r("to_unit", "Target unit", K::E(UNITS))],
        tpl: &["Convert {value} {from_unit} to {to_unit}.", "How many {to_unit} is {value} {from_unit}?"] },
    T { n: "find_recipes", d: "Find recipes that use given ingredients.", want: "recipes",
        ps: &[r("ingredients", "Ingredients to use", K::A(INGREDIENTS)), o("max_minutes", "Maximum cooking time", K::I(10, 120), " that take at most {v} minutes"), o("vegetarian", "Vegetarian only", K::B, ", vegetarian only")],
        tpl: &["Find recipes with {ingredients}{opt}.", "What can I cook with {ingredients}{opt}?"] },
    T { n: "translate_text", d: "Translate text into another language.", want: "a translation",
        ps: &[r("text", "Text to translate", K::S(PHRASES)), r("target_language", "Language to translate into", K::E(LANGS)), o("source_language", "Language of the text", K::E(LANGS), " from {v}")],
        tpl: &["Translate {text} into {target_language}{opt}.", "How do you say {text} in {target_language}{opt}?"] },
    T { n: "set_reminder", d: "Set a reminder.", want: "a reminder",
        ps: &[r("message", "What to remind about", K::S(TASKS)), r("minutes_from_now", "Delay in minutes", K::I(5, 240))],
        tpl: &["Remind me to {message} in {minutes_from_now} minutes.", "In {minutes_from_now} minutes, remind me to {message}."] },
    T { n: "get_news", d: "Get the latest news on a topic.", want: "news",
        ps: &[r("topic", "News topic", K::S(TOPICS)), o("count", "Number of articles", K::I(1, 10), ", top {v} articles")],
        tpl: &["What's the latest news about {topic}{opt}?", "Show me headlines on {topic}{opt}."] },
    T { n: "calculate_tip", d: "Calculate the tip for a bill.", want: "a tip calculation",
        ps: &[r("bill_amount", "Bill total", K::F(AMOUNTS)), r("tip_percent", "Tip percentage", K::I(10, 25)), o("split", "Number of people", K::I(2, 6), " split between {v} people")],
        tpl: &["Calculate a {tip_percent}% tip on a bill of {bill_amount}{opt}.", "What's {tip_percent} percent tip on {bill_amount}{opt}?"] },
    T { n: "get_directions", d: "Get directions between two places.", want: "directions",
        ps: &[r("origin", "Start place", K::S(PLACES)), r("destination", "End place", K::S(PLACES)), o("mode", "Travel mode", K::E(&["driving", "walking", "transit", "cycling"]), " by {v}")],
        tpl: &["How do I get from {origin} to {destination}{opt}?", "Directions from {origin} to {destination}{opt}, please."] },
    T { n: "find_restaurants", d: "Find restaurants in a city.", want: "restaurants",
        ps: &[r("city", "City name", K::S(CITIES)), r("cuisine", "Type of food", K::E(CUISINES)), o("max_price", "Price level 1-4", K::I(1, 4), " with price level at most {v}")],
        tpl: &["Find {cuisine} restaurants in {city}{opt}.", "Where can I eat {cuisine} food in {city}{opt}?"] },
    T { n: "play_music", d: "Play a song.", want: "to play music",
        ps: &[r("song", "Song title", K::S(SONGS)), o("artist", "Artist name", K::S(ARTISTS), " by {v}"), o("shuffle", "Shuffle the queue", K::B, " on shuffle")],
        tpl: &["Play {song}{opt}.", "Put on {song}{opt}."] },
    T { n: "get_movie_showtimes", d: "Get showtimes for a movie.", want: "movie showtimes",
        ps: &[r("movie", "Movie title", K::S(MOVIES)), r("city", "City name", K::S(CITIES)), o("date", "Date, YYYY-MM-DD", K::S(DATES), " on {v}")],
        tpl: &["When is {movie} showing in {city}{opt}?", "Showtimes for {movie} in {city}{opt}."] },
    T { n: "calculate_bmi", d: "Calculate body mass index.", want: "a BMI calculation",
        ps: &[r("weight_kg", "Weight in kg", K::F(WEIGHTS)), r("height_m", "Height in meters", K::F(HEIGHTS))],
        tpl: &["Calculate the BMI for someone who weighs {weight_kg} kg and is {height_m} m tall.", "My weight is {weight_kg} kg and height {height_m} m. What's my BMI?"] },
    T { n: "get_time_zone", d: "Get the time zone of a city.", want: "a time zone",
        ps: &[r("city", "City name", K::S(CITIES))],
        tpl: &["What time zone is {city} in?", "Which time zone does {city} use?"] },
    T { n: "order_food", d: "Order food from a restaurant.", want: "to order food",
        ps: &[r("restaurant", "Restaurant name", K::S(RESTAURANTS)), r("items", "Items to order", K::A(FOODS)), o("delivery", "Deliver instead of pickup", K::B, " for delivery")],
        tpl: &["Order {items} from {restaurant}{opt}.", "Get me {items} from {restaurant}{opt}."] },
    T { n: "track_package", d: "Track a package.", want: "to track a package",
        ps: &[r("tracking_number", "Tracking number", K::S(TRACKING)), o("carrier", "Shipping carrier", K::E(&["UPS", "FedEx", "DHL", "USPS"]), " shipped with {v}")],
        tpl: &["Where is my package {tracking_number}{opt}?", "Track package {tracking_number}{opt}."] },
    T { n: "get_population", d: "Get the population of a country.", want: "population data",
        ps: &[r("country", "Country name", K::S(COUNTRIES)), o("year", "Year", K::I(1990, 2023), " in {v}")],
        tpl: &["What was the population of {country}{opt}?", "How many people live in {country}{opt}?"] },
    T { n: "search_products", d: "Search the online store.", want: "to search for products",
        ps: &[r("query", "Search terms", K::S(PRODUCTS)), o("max_price", "Maximum price", K::F(PRICES), " under {v} dollars"), o("in_stock", "Only items in stock", K::B, " that are in stock")],
        tpl: &["Search the store for {query}{opt}.", "I'm looking for {query}{opt}."] },
];

const OFF_TOPIC: &[&str] = &[
    "Tell me a joke about penguins.", "Write a haiku about autumn.", "Who won the 1998 World Cup?",
    "Explain how photosynthesis works.", "What is the meaning of life?", "Summarize the plot of Hamlet.",
    "How do I fix a leaking faucet?", "Recommend a good book about history.", "What is the square root of 144?",
    "Why is the sky blue?", "Give me tips for a job interview.", "Who painted the Mona Lisa?",
];



/// Number of tools in the catalogue.
pub fn catalogue_size() -> usize {
    TOOLS.len()
}

fn kind_type(k: K) -> &'static str {
    match k {
        K::S(_) | K::E(_) => "string",
        K::I(..) => "integer",
        K::F(_) => "float",
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

fn draw(k: K, rng: &mut ChaCha8Rng) -> Value {
    match k {
        K::S(pool) | K::E(pool) => json!(pool.choose(rng).unwrap()),
        K::I(lo, hi) => json!(rng.random_range(lo..=hi)),
        K::F(pool) => json!(pool.choose(rng).unwrap()),
        K::B => json!(true),
        K::A(pool) => {
            let n = rng.random_range(1..=3usize);
            json!(pool.choose_multiple(rng, n).collect::<Vec<_>>())
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
        Value::Bool(b) => if *b { "True".into() } else { "False".into() },
        Value::Null => "None".into(),
        Value::Number(n) => n.to_string(),
        Value::Array(a) => format!("[{}]", a.iter().map(py).collect::<Vec<_>>().join(", ")),
        Value::Object(o) => format!("{{{}}}", o.iter().map(|(k, v)| format!("'{k}': {}", py(v))).collect::<Vec<_>>().join(", ")),
    }
}

/// One drawn call: the request sentence, the ground-truth entry and the reasoning clause.
struct Drawn {
    request: String,
    gt: Value,
    reason: String,
}

fn draw_call(t: &T, rng: &mut ChaCha8Rng) -> Drawn {
    let mut text = t.tpl.choose(rng).unwrap().to_string();
    let mut opt = String::new();
    let mut gt = Map::new();
    let (mut req_s, mut opt_s) = (Vec::new(), Vec::new());
    let mut used: Vec<Value> = Vec::new();
    for p in t.ps {
        // Distinct values for parameters drawn from the same pool (origin != destination).
        let mut v = draw(p.k, rng);
        for _ in 0..8 {
            if !used.contains(&v) {
                break;
            }
            v = draw(p.k, rng);
        }
        used.push(v.clone());
        if p.req {
            text = text.replace(&format!("{{{}}}", p.n), &nl(&v));
            req_s.push(format!("{}={}", p.n, py(&v)));
            gt.insert(p.n.into(), json!([v]));
        } else if rng.random_bool(0.4) {
            opt.push_str(&p.ph.replace("{v}", &nl(&v)));
            opt_s.push(format!("{}={}", p.n, py(&v)));
            gt.insert(p.n.into(), json!([v]));
        } else {
            gt.insert(p.n.into(), json!([""]));
        }
    }
    let request = text.replace("{opt}", &opt);
    let mut reason = format!("{} fits. Required parameters: {} — all present.", t.n, req_s.join(", "));
    if !opt_s.is_empty() {
        reason.push_str(&format!(" Optional: {}.", opt_s.join(", ")));
    }
    Drawn { request, gt: json!({t.n: gt}), reason }
}

/// Categories and their shares of the task.
const CATEGORIES: &[(&str, f64)] = &[("simple", 0.3), ("multiple", 0.25), ("parallel", 0.15), ("parallel_multiple", 0.15), ("irrelevance", 0.15)];

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

/// One sample of `category` (drawn when `None`).
pub fn sample(id: String, category: Option<&str>, rng: &mut ChaCha8Rng) -> Sample {
    let cat = category.map(|c| CATEGORIES.iter().find(|(n, _)| *n == c).map(|(n, _)| *n).unwrap_or("simple")).unwrap_or_else(|| pick_category(rng));
    let idx: Vec<usize> = (0..TOOLS.len()).collect();
    let (tools, calls, request, reasoning): (Vec<usize>, Vec<Drawn>, String, String) = match cat {
        "simple" => {
            let t = *idx.choose(rng).unwrap();
            let d = draw_call(&TOOLS[t], rng);
            let reasoning = format!("The user wants {}. {}", TOOLS[t].want, d.reason);
            (vec![t], vec![], d.request.clone(), reasoning).with_calls(vec![d])
        }
        "multiple" => {
            let n = rng.random_range(2..=4usize);
            let offered: Vec<usize> = idx.choose_multiple(rng, n).copied().collect();
            let t = *offered.choose(rng).unwrap();
            let d = draw_call(&TOOLS[t], rng);
            let reasoning = format!("The user wants {}. Of the {n} functions, {}", TOOLS[t].want, d.reason);
            (offered, vec![], d.request.clone(), reasoning).with_calls(vec![d])
        }
        "parallel" => {
            let t = *idx.choose(rng).unwrap();
            let n = rng.random_range(2..=3usize);
            let ds: Vec<Drawn> = (0..n).map(|_| draw_call(&TOOLS[t], rng)).collect();
            let request = ds.iter().map(|d| d.request.as_str()).collect::<Vec<_>>().join(" Also: ");
            let reasoning = format!("The user makes {n} requests for {}, one call each. {}", TOOLS[t].want,
                ds.iter().enumerate().map(|(i, d)| format!("{}) {}", i + 1, d.reason)).collect::<Vec<_>>().join(" "));
            (vec![t], vec![], request, reasoning).with_calls(ds)
        }
        "parallel_multiple" => {
            let n = rng.random_range(2..=3usize);
            let extra = rng.random_range(0..=1usize);
            let offered: Vec<usize> = idx.choose_multiple(rng, n + extra).copied().collect();
            let mut chosen: Vec<usize> = offered.clone();
            chosen.shuffle(rng);
            chosen.truncate(n);
            let ds: Vec<Drawn> = chosen.iter().map(|&t| draw_call(&TOOLS[t], rng)).collect();
            let request = ds.iter().map(|d| d.request.as_str()).collect::<Vec<_>>().join(" Also: ");
            let reasoning = format!("The user makes {n} requests: {}. {}", chosen.iter().map(|&t| TOOLS[t].want).collect::<Vec<_>>().join(", "),
                ds.iter().enumerate().map(|(i, d)| format!("{}) {}", i + 1, d.reason)).collect::<Vec<_>>().join(" "));
            (offered, vec![], request, reasoning).with_calls(ds)
        }
        _ => {
            let n = rng.random_range(1..=3usize);
            if rng.random_bool(0.5) {
                // A request for a tool that is not offered.
                let t = *idx.choose(rng).unwrap();
                let others: Vec<usize> = idx.iter().copied().filter(|&i| i != t && TOOLS[i].want != TOOLS[t].want).collect();
                let offered: Vec<usize> = others.choose_multiple(rng, n).copied().collect();
                let d = draw_call(&TOOLS[t], rng);
                let reasoning = format!("The user wants {}, but no available function ({}) provides that. No call.", TOOLS[t].want,
                    offered.iter().map(|&i| TOOLS[i].n).collect::<Vec<_>>().join(", "));
                (offered, vec![], d.request, reasoning)
            } else {
                let offered: Vec<usize> = idx.choose_multiple(rng, n).copied().collect();
                let q = OFF_TOPIC.choose(rng).unwrap().to_string();
                let reasoning = format!("The user asks something none of the functions ({}) can do. No call.",
                    offered.iter().map(|&i| TOOLS[i].n).collect::<Vec<_>>().join(", "));
                (offered, vec![], q, reasoning)
            }
        }
    };
    Sample {
        id,
        category: cat.to_string(),
        messages: vec![Message { role: "user".into(), content: request }],
        functions: tools.iter().map(|&t| tool_doc(&TOOLS[t])).collect(),
        ground_truth: calls.into_iter().map(|d| d.gt).collect(),
        reasoning: Some(reasoning),
    }
}

trait WithCalls {
    fn with_calls(self, calls: Vec<Drawn>) -> (Vec<usize>, Vec<Drawn>, String, String);
}
impl WithCalls for (Vec<usize>, Vec<Drawn>, String, String) {
    fn with_calls(self, calls: Vec<Drawn>) -> (Vec<usize>, Vec<Drawn>, String, String) {
        (self.0, calls, self.2, self.3)
    }
}

/// The task: `n_train` training samples and `n_eval` held-out ones (no request text shared).
pub fn generate(seed: u64, n_train: usize, n_eval: usize) -> (Vec<Sample>, Vec<Sample>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let train: Vec<Sample> = (0..n_train).map(|i| sample(format!("synth_train_{i}"), None, &mut rng)).collect();
    let seen: HashSet<&str> = train.iter().map(|s| s.messages[0].content.as_str()).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_e7a1);
    let mut eval = Vec::with_capacity(n_eval);
    let mut tries = 0;
    while eval.len() < n_eval && tries < n_eval * 50 {
        tries += 1;
        let s = sample(format!("synth_eval_{}", eval.len()), None, &mut rng);
        // Off-topic irrelevance requests come from a small pool; keep them all the same.
        if s.category == "irrelevance" || !seen.contains(s.messages[0].content.as_str()) {
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
        serde_json::to_writer(&mut text, &line).with_context(|| format!("{}: cannot serialize sample {}", path.display(), s.id))?;
        text.write_all(b"\n")?;
    }
    crate::runfs::write_atomic(path, &text)
}

/// The instruction appended to the tool list in the system prompt.
pub const SYSTEM_INSTRUCTION: &str = "Think step by step inside <think></think>, then answer with only the list of calls, e.g. [f(a=1, b='x')]. If no function fits, say so in plain text.";

/// Compact ChatML prompt: system (tools as JSON + instruction), the conversation, then the
/// open assistant turn. The completion follows directly.
pub fn render_prompt(messages: &[Message], tools: &[Value]) -> String {
    let mut sys = String::from("You can call these functions:\n");
    for t in tools {
        sys.push_str(&serde_json::to_string(t).unwrap_or_default());
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
    fn python_literals() {
        assert_eq!(py(&json!(2.5)), "2.5");
        assert_eq!(py(&json!(100.0)), "100.0");
        assert_eq!(py(&json!("it's")), "'it\\'s'");
    }
}
