fn main() {
    println!("{}", ferrotune_core::version());
}
