print("img")
