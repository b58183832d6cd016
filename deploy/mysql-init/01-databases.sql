-- Run once by the MySQL image on an empty data directory, after it created the user `shop`
-- (MYSQL_USER). One database per service (docs/platform.md: each owns its schema and
-- applies its own migrations at start-up).
CREATE DATABASE IF NOT EXISTS `auth`;
CREATE DATABASE IF NOT EXISTS `inventory`;
CREATE DATABASE IF NOT EXISTS `orders`;
CREATE DATABASE IF NOT EXISTS `notification`;
GRANT ALL PRIVILEGES ON `auth`.* TO 'shop'@'%';
GRANT ALL PRIVILEGES ON `inventory`.* TO 'shop'@'%';
GRANT ALL PRIVILEGES ON `orders`.* TO 'shop'@'%';
GRANT ALL PRIVILEGES ON `notification`.* TO 'shop'@'%';
